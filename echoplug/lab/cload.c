/*
 * echoplug/lab/cload.c - the reactor lab's fast load client.
 *
 * Why C: the lab bills the *server's* CPU time per echoed message, and a
 * server that waits for its client wakes up for tiny batches, each wake-up
 * billed to it. The Twisted load client (echoplug/load.py) cannot keep a
 * Python server busy on a 2-core machine, so every figure it gives is about
 * twice what a saturated server costs. This client needs a few per cent of
 * a core for the same load, so the server, not the client, sets the pace.
 *
 * It speaks exactly the command line and the stdin/stdout protocol of
 * `python -m echoplug.lab.load` (see that module's docstring): the workloads
 * `load` (each connection keeps one message in flight, every echoed byte
 * checked against what was sent, rotating through 4 seeded payloads so that
 * a stale echo is caught) and `churn` (each loop connects, echoes one
 * message, closes, and starts over) and `udp` (each connected UDP socket
 * keeps one datagram in flight, checked whole; one not back within
 * RESEND_MS is sent again, and a late duplicate is skipped); with --sync it
 * prints "ready" after the
 * warm-up, waits for "go" on stdin, measures --duration seconds, drains what
 * is in flight, prints one JSON line and holds its sockets open until stdin
 * says "quit" or closes. --reactor is accepted and ignored.
 *
 * Built on demand by echoplug.lab.cbuild with `cc -O2`; libc and epoll only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOADS 4
#define MAX_RTTS 400000 /* RTTs kept: past this, every other one is dropped */
#define STDIN_TAG UINT32_MAX
#define RESEND_MS 200 /* udp: resend a datagram not echoed within this */
#define MAX_DATAGRAM 65507

typedef struct {
    int fd;
    int connecting;      /* churn: a non-blocking connect() under way */
    int index;           /* the payload in flight */
    size_t sent, got;    /* bytes of it sent and received */
    int64_t sentAt;      /* ns */
    int busy;            /* a message (or churned connection) in flight */
    int out;             /* EPOLLOUT is in its watched events */
} Conn;

static struct {
    const char *host, *workload;
    int port, connections, size, sync;
    double duration, warmup;
    unsigned long seed;
} opt = {"127.0.0.1", "load", 0, 1, 64, 0, 2.0, 0.5, 862};

static unsigned char *payloads[PAYLOADS];
static unsigned char *rbuf;
static Conn *conns;
static int ep, churn, udp, measuring, sending = 1, draining, inFlight;
static long messages, inWindow, resent;
static int32_t *rtts;
static long nRtts, rttStride = 1, rttSkip;
static char error[256];
static struct sockaddr_storage addr;
static socklen_t addrLen;

static int64_t now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void fail(const char *fmt, ...) {
    if (!error[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(error, sizeof error, fmt, ap);
        va_end(ap);
    }
    sending = 0;
}

static void usage(const char *why) {
    fprintf(stderr, "cload: %s\n", why);
    exit(2);
}

static void parseArgs(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--sync")) { opt.sync = 1; continue; }
        if (i + 1 >= argc) usage("an option lacks its value");
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) opt.host = v;
        else if (!strcmp(a, "--port")) opt.port = atoi(v);
        else if (!strcmp(a, "--workload")) opt.workload = v;
        else if (!strcmp(a, "--connections")) opt.connections = atoi(v);
        else if (!strcmp(a, "--size")) opt.size = atoi(v);
        else if (!strcmp(a, "--duration")) opt.duration = atof(v);
        else if (!strcmp(a, "--warmup")) opt.warmup = atof(v);
        else if (!strcmp(a, "--seed")) opt.seed = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--reactor")) ; /* the Python client's; no meaning here */
        else usage("unknown option");
    }
    if (opt.port <= 0 || opt.port > 65535) usage("--port must be 1-65535");
    if (strcmp(opt.workload, "load") && strcmp(opt.workload, "churn") &&
        strcmp(opt.workload, "udp"))
        usage("--workload is load, churn or udp");
    if (opt.connections < 1 || opt.size < 1 || !(opt.duration > 0) || opt.warmup < 0)
        usage("--connections and --size must be at least 1, --duration above 0");
    churn = !strcmp(opt.workload, "churn");
    udp = !strcmp(opt.workload, "udp");
    if (udp && opt.size > MAX_DATAGRAM) usage("--size: a UDP datagram holds at most 65507 bytes");
}

/* The server's address; an IPv4 one first, as Twisted's connectTCP (and so
 * echoplug.lab.load) resolves names to IPv4 only. */
static void resolve(void) {
    struct addrinfo hints = {0}, *res, *a;
    hints.ai_socktype = udp ? SOCK_DGRAM : SOCK_STREAM;
    char port[16];
    snprintf(port, sizeof port, "%d", opt.port);
    if (getaddrinfo(opt.host, port, &hints, &res) != 0 || !res) {
        fail("cannot connect: cannot resolve %s", opt.host);
        return;
    }
    for (a = res; a->ai_next && a->ai_family != AF_INET; a = a->ai_next)
        ;
    if (a->ai_family != AF_INET) a = res;
    memcpy(&addr, a->ai_addr, a->ai_addrlen);
    addrLen = a->ai_addrlen;
    freeaddrinfo(res);
}

static void watch(int op, int fd, uint32_t events, uint32_t tag) {
    struct epoll_event e = {.events = events, .data.u32 = tag};
    if (epoll_ctl(ep, op, fd, &e) < 0 && op != EPOLL_CTL_DEL) fail("epoll_ctl: %s", strerror(errno));
}

static void record(int64_t rttNs) {
    if (measuring) {
        inWindow++;
        if (rttSkip++ % rttStride == 0) {
            if (nRtts == MAX_RTTS) { /* keep every other one, and sample half as often */
                for (long i = 0; i < MAX_RTTS / 2; i++) rtts[i] = rtts[2 * i];
                nRtts = MAX_RTTS / 2;
                rttStride *= 2;
            }
            rtts[nRtts++] = (int32_t)(rttNs / 1000);
        }
    }
    if (measuring || draining) messages++;
}

/* Send what is left of the message in flight; watch for writability only
 * while the kernel has not taken it all (an epoll_ctl per message would
 * cost the client a syscall more than the server pays). */
static void pump(Conn *c, uint32_t tag) {
    const unsigned char *p = payloads[c->index];
    while (c->sent < (size_t)opt.size) {
        ssize_t n = send(c->fd, p + c->sent, opt.size - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) break;
            fail("connection lost: %s", strerror(errno));
            return;
        }
        c->sent += n;
    }
    int out = c->sent < (size_t)opt.size;
    if (out != c->out) {
        c->out = out;
        watch(EPOLL_CTL_MOD, c->fd, EPOLLIN | (out ? EPOLLOUT : 0), tag);
    }
}

static void startMessage(Conn *c, uint32_t tag) {
    c->index = (c->index + 1) % PAYLOADS;
    c->sent = c->got = 0;
    c->busy = 1;
    inFlight++;
    c->sentAt = now();
    pump(c, tag);
}

static int openSocket(int blocking) {
    int fd = socket(addr.ss_family, (udp ? SOCK_DGRAM : SOCK_STREAM) |
                                     (blocking ? 0 : SOCK_NONBLOCK), 0);
    if (fd < 0) { fail("socket: %s", strerror(errno)); return -1; }
    int one = 1;
    if (!udp) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* churn: start one connection of loop c. */
static void startChurn(Conn *c, uint32_t tag) {
    if (!sending) return;
    c->fd = openSocket(0);
    if (c->fd < 0) return;
    c->index = 0;
    c->sent = c->got = 0;
    c->busy = 1;
    inFlight++;
    c->sentAt = now();
    c->connecting = 1;
    c->out = 1;
    if (connect(c->fd, (struct sockaddr *)&addr, addrLen) < 0 && errno != EINPROGRESS) {
        fail("cannot connect: %s", strerror(errno));
        return;
    }
    watch(EPOLL_CTL_ADD, c->fd, EPOLLOUT, tag);
}

static void completed(Conn *c, uint32_t tag) {
    c->busy = 0;
    inFlight--;
    record(now() - c->sentAt);
    if (churn) {
        close(c->fd); /* also leaves the epoll set */
        c->fd = -1;
        startChurn(c, tag);
    } else if (sending) {
        startMessage(c, tag);
    }
}

/* udp: one datagram at a time, whole; a late echo of a resent datagram
 * (the one before, in this closed loop) is skipped. */
static void readableDatagram(Conn *c, uint32_t tag) {
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, MAX_DATAGRAM + 1, 0);
        if (n < 0) {
            if (errno == EAGAIN) return;
            fail("datagram lost: %s", strerror(errno));
            return;
        }
        if (c->busy && n == opt.size && !memcmp(rbuf, payloads[c->index], n)) {
            completed(c, tag);
            continue;
        }
        int previous = (c->index + PAYLOADS - 1) % PAYLOADS;
        if (n == opt.size && !memcmp(rbuf, payloads[previous], n)) continue;
        fail("echo mismatch on a %d-byte datagram (%zd bytes came back)", opt.size, n);
        return;
    }
}

/* udp: send again what was not echoed within RESEND_MS. */
static void resend(void) {
    int64_t t = now();
    for (int i = 0; i < opt.connections; i++) {
        Conn *c = &conns[i];
        if (c->busy && c->sent == (size_t)opt.size && t - c->sentAt > RESEND_MS * 1000000LL) {
            c->sent = 0;
            c->sentAt = t; /* the RTT is then from the resend: the loss shows in resent */
            resent++;
            pump(c, i);
        }
    }
}

static void readable(Conn *c, uint32_t tag) {
    if (udp) {
        readableDatagram(c, tag);
        return;
    }
    for (;;) {
        size_t want = opt.size - c->got;
        ssize_t n = recv(c->fd, rbuf, want ? want : 1, 0);
        if (n < 0) {
            if (errno == EAGAIN) return;
            fail("connection lost: %s", strerror(errno));
            return;
        }
        if (n == 0) {
            fail(churn ? "connection closed before the whole echo came back"
                       : "connection lost: the server closed it");
            return;
        }
        if (!c->busy || (size_t)n > want || memcmp(rbuf, payloads[c->index] + c->got, n)) {
            fail("echo mismatch on a %d-byte message", opt.size);
            return;
        }
        c->got += n;
        if (c->got == (size_t)opt.size) {
            completed(c, tag);
            return;
        }
    }
}

static void event(uint32_t tag, uint32_t events) {
    Conn *c = &conns[tag];
    if (churn && c->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { fail("cannot connect: %s", strerror(err)); return; }
        c->connecting = 0;
        pump(c, tag);
        return;
    }
    if (events & EPOLLOUT) pump(c, tag);
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(c, tag);
}

static char line[256];
static size_t lineLen;
static int gotGo, gotQuit;

static void readStdin(void) {
    char buf[256];
    ssize_t n = read(0, buf, sizeof buf);
    if (n <= 0) {
        watch(EPOLL_CTL_DEL, 0, 0, STDIN_TAG); /* EOF stays readable: stop asking */
        gotQuit = 1;
        if (!gotGo) fail("stdin closed before 'go'");
        return;
    }
    for (ssize_t i = 0; i < n; i++) {
        if (buf[i] != '\n') {
            if (lineLen < sizeof line - 1) line[lineLen++] = buf[i];
            continue;
        }
        line[lineLen] = 0;
        lineLen = 0;
        if (!strcmp(line, "go")) gotGo = 1;
        if (!strcmp(line, "quit")) gotQuit = 1;
    }
}

/* Run the loop until `until` (ns, 0: no deadline) or until *flag is set. */
static void loop(int64_t until, const int *flag) {
    struct epoll_event events[256];
    int64_t lastScan = now();
    while (!error[0] && !(flag && *flag)) {
        int64_t t = now();
        if (until && t >= until) return;
        if (udp && t - lastScan > RESEND_MS * 1000000LL / 2) {
            lastScan = t;
            resend();
        }
        int ms = until ? (int)((until - t) / 1000000) + 1 : 100;
        if (udp && ms > RESEND_MS / 2) ms = RESEND_MS / 2;
        int n = epoll_wait(ep, events, 256, ms);
        if (n < 0 && errno != EINTR) { fail("epoll_wait: %s", strerror(errno)); return; }
        for (int i = 0; i < n; i++) {
            if (events[i].data.u32 == STDIN_TAG) readStdin();
            else event(events[i].data.u32, events[i].events);
        }
        if (draining && inFlight == 0) return;
    }
}

int main(int argc, char **argv) {
    parseArgs(argc, argv);
    resolve();
    unsigned long s = opt.seed * 2654435761UL + 1;
    for (int p = 0; p < PAYLOADS; p++) {
        payloads[p] = malloc(opt.size);
        for (int i = 0; i < opt.size; i++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17; /* xorshift64 */
            payloads[p][i] = (unsigned char)(s >> 24);
        }
    }
    rbuf = malloc(udp ? MAX_DATAGRAM + 1 : opt.size);
    rtts = malloc(sizeof *rtts * MAX_RTTS);
    conns = calloc(opt.connections, sizeof *conns);
    ep = epoll_create1(0);
    if (opt.sync) watch(EPOLL_CTL_ADD, 0, EPOLLIN, STDIN_TAG);

    if (churn) {
        for (int i = 0; i < opt.connections; i++) startChurn(&conns[i], i);
    } else {
        /* One connection at a time, blocking: a burst of connects could
         * overflow the server's listen backlog (a dropped SYN costs 1 s). */
        for (int i = 0; i < opt.connections && !error[0]; i++) {
            int fd = openSocket(1);
            if (fd < 0) break;
            if (connect(fd, (struct sockaddr *)&addr, addrLen) < 0) {
                fail("cannot connect: %s", strerror(errno));
                break;
            }
            fcntl(fd, F_SETFL, O_NONBLOCK);
            conns[i].fd = fd;
            watch(EPOLL_CTL_ADD, fd, EPOLLIN, i);
        }
        for (int i = 0; i < opt.connections && !error[0]; i++) startMessage(&conns[i], i);
    }

    loop(now() + (int64_t)(opt.warmup * 1e9), NULL);
    if (opt.sync && !error[0]) {
        printf("ready\n");
        fflush(stdout);
        loop(0, &gotGo);
    }
    messages = inWindow = nRtts = rttSkip = resent = 0;
    measuring = 1;
    int64_t started = now();
    loop(started + (int64_t)(opt.duration * 1e9), NULL);
    double seconds = (now() - started) / 1e9;
    measuring = 0;
    sending = 0;
    draining = 1;
    if (!error[0] && inFlight) {
        loop(now() + 10 * (int64_t)1000000000, NULL);
        if (!error[0] && inFlight) fail("timed out waiting for the echoes in flight");
    }

    printf("{\"workload\":\"%s\",\"messages\":%ld,\"inWindow\":%ld,\"seconds\":%.6f,",
           opt.workload, messages, inWindow, seconds);
    if (udp) printf("\"resent\":%ld,", resent); /* datagrams sent again after a loss */
    printf("\"rttUs\":[");
    for (long i = 0; i < nRtts; i++) printf(i ? ",%d" : "%d", rtts[i]);
    if (error[0]) {
        printf("],\"error\":\"");
        for (const char *p = error; *p; p++)
            if (*p != '"' && *p != '\\' && (unsigned char)*p >= 32) putchar(*p);
        printf("\"}\n");
    } else {
        printf("],\"error\":null}\n");
    }
    fflush(stdout);
    int failed = error[0] != 0;
    if (opt.sync) {
        /* Hold the sockets open, unwatched, until the runner is done. */
        for (int i = 0; i < opt.connections; i++)
            if (conns[i].fd > 0) watch(EPOLL_CTL_DEL, conns[i].fd, 0, i);
        error[0] = 0;
        draining = 0;
        while (!gotQuit && !error[0]) loop(0, &gotQuit);
    }
    return failed;
}
