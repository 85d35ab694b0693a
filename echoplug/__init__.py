"""
echoplug: an echo service (RFC 862) shipped as a twistd plugin: TCP, and
UDP on request.

The service, one job per module:

  - L{echoplug.tap}: the C{twistd echoplug} command line (C{Options}, C{makeService});
  - L{echoplug.service}: listeners and the service's lifecycle (start-up line,
    descriptor limits, idle sweep, drain on shutdown, queued connections accepted
    first);
  - L{echoplug.factory}: builds protocols and keeps the books on open connections
    (caps, counters, the access line);
  - L{echoplug.protocol}: the per-connection echo, with flow control and half-close;
  - L{echoplug.proxied}: that echo behind a load balancer (C{--proxy-protocol});
  - L{echoplug.proxyheader}: the PROXY protocol header (v1, v2), parsed without I/O;
  - L{echoplug.udp}: UDP echo (C{udp:}, C{systemd-udp:}) and the guards that
    every datagram passes (source ports, source addresses, rate limits);
  - L{echoplug.eager}: which transports write (and close) at once rather than on
    the reactor's next turn;
  - L{echoplug.logs}: log levels, the access-log line and the observers behind
    C{--log-format};
  - L{echoplug.metrics}: C{--metrics}, Prometheus text read from the factory's books;
  - L{echoplug.notify}: systemd's C{sd_notify} (C{READY=1}, C{STOPPING=1}, the watchdog);
  - L{echoplug.reactors}: the lean reactors C{echoplug-epoll}, C{echoplug-poll},
    C{echoplug-select}, and C{install(name)} for echoplug's own commands;
  - L{echoplug.workers}: C{--workers N}, the parent: binds the listeners, starts,
    supervises and drains N worker processes, and speaks for them (metrics, systemd);
  - L{echoplug.worker}: one worker: adopts the parent's sockets, reports to it,
    stops when it goes;
  - L{echoplug.books}: the workers' counters in memory shared with the parent,
    and the fair share of connections each worker keeps to;
  - L{echoplug._twisted}: every read of a private Twisted name, in one place;
  - L{echoplug.client}: C{echoplug-client}, the original two-socket chunked client.

Beside it, L{echoplug.lab}: everything that measures or stresses a server
(C{echoplug-bench}, C{echoplug-soak}, the load clients and the peers). The
service never imports the lab.
"""

__version__ = "0.1.0"
