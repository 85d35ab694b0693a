/*
 * echoplug/lab/cudpecho.c - the "c-epoll" peer of the lab's udp workload.
 *
 * A plain UDP echo in C: epoll for readability, then recvfrom() and sendto()
 * each datagram back to its source until the socket is empty. No guards, no
 * counters, no logging: the floor that echoplug's UDP echo (with its
 * guards) and the asyncio DatagramProtocol echo are measured against, with
 * `echoplug-bench --workload udp --peer c-epoll`. A datagram the kernel has
 * no room to send is dropped, as UDP allows. Usage: cudpecho PORT (on
 * 127.0.0.1). Built on demand by echoplug.lab.cbuild.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2 || atoi(argv[1]) <= 0 || atoi(argv[1]) > 65535) {
        fprintf(stderr, "usage: cudpecho PORT\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        fprintf(stderr, "cudpecho: cannot listen on 127.0.0.1:%d: %s\n", port, strerror(errno));
        return 1;
    }
    printf("listening on 127.0.0.1:%d, reactor=C (epoll), UDP\n", port);
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    static char buf[65536];
    for (;;) {
        if (epoll_wait(ep, &e, 1, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        for (;;) {
            struct sockaddr_storage from;
            socklen_t len = sizeof from;
            ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
            if (n < 0) break; /* EAGAIN: empty */
            sendto(fd, buf, n, 0, (struct sockaddr *)&from, len);
        }
    }
}
