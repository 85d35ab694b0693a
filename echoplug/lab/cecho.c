/*
 * echoplug/lab/cecho.c - the "c-epoll" peer of the reactor lab: the floor.
 *
 * A plain epoll echo server in C, as small as one can be while still being
 * correct: it reads, writes back at once, and when the kernel will not take
 * all of it, stops reading that connection until the rest is sent (so a
 * client that never reads cannot grow it), and after the client's EOF it
 * sends what is left and closes. No logging, no limits, no timeouts.
 *
 * It is what a Python server is measured against to say how far from the
 * floor it is: `echoplug-bench --peer c-epoll`. Usage: cecho PORT (on
 * 127.0.0.1). Built on demand by echoplug.lab.cbuild, like cload.c.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536

typedef struct {
    int fd;
    char *pending; /* bytes read but not yet written back */
    size_t len, off;
} Conn;

static int ep;

static void watch(int op, Conn *c, unsigned events) {
    struct epoll_event e = {.events = events, .data.ptr = c};
    epoll_ctl(ep, op, c->fd, &e);
}

static void drop(Conn *c) {
    close(c->fd); /* also leaves the epoll set */
    free(c->pending);
    free(c);
}

/* Send what is pending; 0 when all of it went, 1 when some is left, -1 on error. */
static int flush(Conn *c) {
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->pending + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN ? 1 : -1;
        c->off += n;
    }
    c->len = c->off = 0;
    return 0;
}

static void readable(Conn *c) {
    static char buf[BUF];
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0) {
        if (errno != EAGAIN) drop(c);
        return;
    }
    if (n == 0) { /* EOF: nothing is pending while we read, so close now */
        drop(c);
        return;
    }
    ssize_t sent = send(c->fd, buf, n, MSG_NOSIGNAL);
    if (sent < 0) {
        if (errno != EAGAIN) { drop(c); return; }
        sent = 0;
    }
    if (sent < n) { /* keep the rest; stop reading until it is sent */
        c->pending = realloc(c->pending, n - sent);
        memcpy(c->pending, buf + sent, n - sent);
        c->len = n - sent;
        c->off = 0;
        watch(EPOLL_CTL_MOD, c, EPOLLOUT);
    }
}

static void writable(Conn *c) {
    int r = flush(c);
    if (r < 0) drop(c);
    else if (r == 0) watch(EPOLL_CTL_MOD, c, EPOLLIN);
}

int main(int argc, char **argv) {
    if (argc != 2 || atoi(argv[1]) <= 0 || atoi(argv[1]) > 65535) {
        fprintf(stderr, "usage: cecho PORT\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 128) < 0) {
        fprintf(stderr, "cecho: cannot listen on 127.0.0.1:%d: %s\n", port, strerror(errno));
        return 1;
    }
    printf("listening on 127.0.0.1:%d, reactor=C (epoll)\n", port);
    fflush(stdout);
    ep = epoll_create1(0);
    struct epoll_event le = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &le);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            Conn *c = events[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    watch(EPOLL_CTL_ADD, c, EPOLLIN);
                }
                continue;
            }
            if (events[i].events & EPOLLOUT) writable(c);
            else if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(c);
        }
    }
}
