/*
 * echoplug/lab/pollcount.c - counts a server's poller calls, for the reactor
 * lab's dead-connection curve: LD_PRELOAD this into a server with
 * ECHOPLUG_LAB_CALLS=PATH, and every call of select, pselect, poll, ppoll,
 * epoll_wait, epoll_pwait and epoll_pwait2 adds one to the 8-byte counter
 * mapped from PATH (created if absent). The runner reads the file before and
 * after a window: the difference is the server's wake-ups, one per return
 * from its event loop's poller, whether the call blocked or not.
 *
 * A process forked or exec'd by the server (twistd --workers) inherits the
 * preload and the path and adds to the same counter. An event loop that
 * calls the kernel without libc (none of the lab's servers does) is not
 * counted, and the lab then reports no wake-ups rather than a wrong number.
 *
 * Built on demand by echoplug.lab.cbuild as a shared object.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <unistd.h>

static volatile uint64_t *counter;
static uint64_t unmapped; /* where counts go if the file cannot be mapped */

__attribute__((constructor)) static void setUp(void) {
    counter = &unmapped;
    const char *path = getenv("ECHOPLUG_LAB_CALLS");
    if (!path) return;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return;
    if (ftruncate(fd, sizeof(uint64_t)) == 0) {
        void *p = mmap(NULL, sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) counter = p;
    }
    close(fd);
}

#define COUNT() __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED)
#define NEXT(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)

int select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *t) {
    NEXT(select); COUNT(); return real(n, r, w, e, t);
}
int pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *t,
            const sigset_t *m) {
    NEXT(pselect); COUNT(); return real(n, r, w, e, t, m);
}
int poll(struct pollfd *fds, nfds_t n, int timeout) {
    NEXT(poll); COUNT(); return real(fds, n, timeout);
}
int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *t, const sigset_t *m) {
    NEXT(ppoll); COUNT(); return real(fds, n, t, m);
}
int epoll_wait(int ep, struct epoll_event *ev, int max, int timeout) {
    NEXT(epoll_wait); COUNT(); return real(ep, ev, max, timeout);
}
int epoll_pwait(int ep, struct epoll_event *ev, int max, int timeout, const sigset_t *m) {
    NEXT(epoll_pwait); COUNT(); return real(ep, ev, max, timeout, m);
}
int epoll_pwait2(int ep, struct epoll_event *ev, int max, const struct timespec *t,
                 const sigset_t *m) {
    NEXT(epoll_pwait2); COUNT(); return real(ep, ev, max, t, m);
}
