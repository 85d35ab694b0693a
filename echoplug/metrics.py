# -*- test-case-name: tests.test_metrics -*-
"""
C{--metrics}: Prometheus text at C{/metrics}, read from the factory's books.

This module imports prometheus_client (the C{metrics} extra), so only
L{echoplug.tap} imports it, and only when C{--metrics} is given: never the
dropin, never C{import echoplug}.

What a scrape costs
===================
The page is rendered on the reactor thread (not through
C{prometheus_client.twisted.MetricsResource}, which runs the WSGI app in the
reactor's thread pool, where reading the factory's books would race the
reactor that changes them), so every millisecond a scrape takes is a
millisecond no echo is served. A scrape therefore costs the same whatever
the number of connections: L{EchoCollector} reads running totals that the
factory keeps once per connection (at accept and at close), never a sum
over the open connections; and L{ProcessStats} replaces prometheus_client's
C{ProcessCollector}, which lists C{/proc/self/fd} at every scrape (about
17 ms at 15,000 descriptors).

The HTTP side, and why it is twisted.web
========================================
The metrics port faces whoever can reach it, so each thing a client can make
the server hold is bounded. twisted.web does most of this already, with a
few documented overrides in L{MetricsChannel} and L{MetricsSite}:

  - One request per connection (C{checkPersistence} says no, and the
    response carries C{Connection: close}). A client that pipelines
    requests without reading the answers gets one answer; twisted.web stops
    reading when it closes the connection and drops the rest unparsed. With
    keep-alive, twisted.web renders each pipelined request of a read at
    once, and the transport's request to pause, arriving while a request is
    being handled, is lost: that is how one client grew the server by
    hundreds of MiB. A scraper opens one connection every scrape interval:
    nothing worth keeping alive.
  - No body is ever read: a request with a C{Transfer-Encoding}, or a
    C{Content-Length} other than 0, is answered 413 as soon as its headers
    end, and the connection closes (twisted.web would otherwise spool a
    large body into a temporary file).
  - Only C{GET} and C{HEAD} of C{/metrics}: other methods get 405 (from
    L{Resource}), other paths 404.
  - Headers: at most L{MetricsChannel.maxHeaders} of them and
    L{MetricsChannel.totalHeadersSize} bytes (twisted.web's own limits,
    lowered; over them, 400).
  - A deadline per connection, L{MetricsSite.deadline} from accept to
    close, whatever the client sends: twisted.web's own timeout is an idle
    timeout, reset by every byte, so a client trickling a header byte at a
    time would hold the connection for ever.
  - At most L{MetricsSite.maxConnections} connections at once: the rest are
    closed at accept, so idle metrics clients cannot take the descriptors
    that echo clients need.

Refusals, timeouts and rejected bodies are counted (L{MetricsSite.counts},
exported as C{echoplug_metrics_*}) and logged at most once a second.
A hand-written HTTP/1.0 responder on C{LineReceiver} would be as short, but
it would be HTTP parsing of our own, on the port attackers reach.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from echoplug import __version__
from echoplug.logs import formatAddress
from echoplug.service import Listener, reactorName


class EchoCollector(Collector):
    """
    The echo service's metrics, from totals the factory keeps once per
    connection: a scrape reads a handful of numbers, however many
    connections are open.

    Bytes are counted when a connection closes: received is what it read,
    sent what it handed to the kernel (received less what was still
    buffered when it closed). A connection still open adds its bytes when
    it closes; counting them live would cost either work on every message
    or a sum over every open connection at each scrape, on the reactor
    thread. Once a connection has closed after a complete echo, both
    counters have risen by exactly its size.
    """

    def __init__(self, factory: Any, reactor: Any) -> None:
        self.factory = factory
        self.reactor = reactorName(reactor)
        self.reactorClass = type(reactor).__name__

    def collect(self) -> Iterator[Metric]:
        f = self.factory
        yield CounterMetricFamily(
            "echoplug_connections_accepted", "Connections accepted since start.",
            value=f.accepted)
        yield CounterMetricFamily(
            "echoplug_connections_refused",
            "Connections refused since start (closed at once, over a connection cap).",
            value=f.refused)
        yield GaugeMetricFamily(
            "echoplug_connections_open", "Connections open now.", value=len(f.connections))
        yield CounterMetricFamily(
            "echoplug_received_bytes", "Bytes received from clients, on closed connections.",
            value=f.bytesReceived)
        yield CounterMetricFamily(
            "echoplug_sent_bytes",
            "Bytes echoed back (handed to the kernel), on closed connections.",
            value=f.bytesSent)
        failures = CounterMetricFamily(
            "echoplug_proxy_header_failures",
            "Connections closed for a bad PROXY header, or none in time, by reason.",
            labels=["reason"])
        for reason, n in f.headerFailures.items():
            failures.add_metric([reason], n)
        yield failures
        bound = f.bound
        yield GaugeMetricFamily(
            "echoplug_buffered_bytes",
            "Bytes counted against --max-buffered now (held, or that may be, waiting to be "
            "echoed).", value=0 if bound is None else bound.total)
        yield CounterMetricFamily(
            "echoplug_buffer_stalls",
            "Connections stopped from reading because --max-buffered was reached.",
            value=0 if bound is None else bound.stalls)
        yield InfoMetricFamily(
            "echoplug", "echoplug's version and the Twisted reactor it runs on.",
            value={"version": __version__, "reactor": self.reactor,
                   "reactor_class": self.reactorClass})


class ProcessStats(Collector):
    """
    The C{process_*} metrics of prometheus_client's C{ProcessCollector},
    under the same names, without listing C{/proc/self/fd} at each scrape.

    C{process_open_fds} is the size that C{stat()} reports for
    C{/proc/self/fd}: Linux 6.2 and later give the number of open
    descriptors there, at a constant cost (a few microseconds). Older
    kernels give 0, and then the metric is left out rather than paid for
    with a directory listing; C{echoplug_connections_open} says the same
    to within the listeners and the log.
    """

    def __init__(self) -> None:
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.pageSize = resource.getpagesize()
        self.bootTime = 0.0
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"btime "):
                        self.bootTime = float(line.split()[1])
        except OSError:
            pass

    def collect(self) -> Iterator[Metric]:
        try:
            with open("/proc/self/stat", "rb") as f:
                # The command name, in parentheses, may hold spaces.
                parts = f.read().rsplit(b")", 1)[-1].split()
        except OSError:
            return
        yield CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.",
            value=(float(parts[11]) + float(parts[12])) / self.ticks)
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.",
            value=float(parts[20]))
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory size in bytes.",
            value=float(parts[21]) * self.pageSize)
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            value=float(parts[19]) / self.ticks + self.bootTime)
        yield GaugeMetricFamily(
            "process_max_fds", "Maximum number of open file descriptors.",
            value=float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        try:
            fds = os.stat("/proc/self/fd").st_size
        except OSError:
            fds = 0
        if fds:
            yield GaugeMetricFamily(
                "process_open_fds", "Number of open file descriptors.", value=float(fds))


class MetricsPortCollector(Collector):
    """The metrics port's own books: what L{MetricsSite} refused and why."""

    def __init__(self, site: MetricsSite) -> None:
        self.site = site

    def collect(self) -> Iterator[Metric]:
        counts = self.site.counts
        yield GaugeMetricFamily(
            "echoplug_metrics_connections_open", "Connections to the metrics port open now.",
            value=self.site.open)
        yield CounterMetricFamily(
            "echoplug_metrics_connections_refused",
            "Metrics connections refused at accept (over the cap).",
            value=counts["refused"])
        yield CounterMetricFamily(
            "echoplug_metrics_timeouts",
            "Metrics connections closed at the deadline.", value=counts["timeout"])
        yield CounterMetricFamily(
            "echoplug_metrics_bodies_refused",
            "Metrics requests refused (413) for announcing a body.", value=counts["body"])


class DatagramCollector(Collector):
    """
    The UDP echo's counters (L{echoplug.udp.DatagramGuards}), read at
    scrape time: datagrams and bytes received and echoed, and datagrams
    dropped by reason (the guards, and echoes the kernel had no room for).
    """

    def __init__(self, guards: Any) -> None:
        self.guards = guards

    def collect(self) -> Iterator[Metric]:
        g = self.guards
        yield CounterMetricFamily("echoplug_udp_datagrams_received",
                                  "UDP datagrams received.", value=g.received)
        yield CounterMetricFamily("echoplug_udp_received_bytes",
                                  "Bytes of the UDP datagrams received.", value=g.receivedBytes)
        yield CounterMetricFamily("echoplug_udp_datagrams_sent",
                                  "UDP datagrams echoed (handed to the kernel).", value=g.sent)
        yield CounterMetricFamily("echoplug_udp_sent_bytes",
                                  "Bytes of the UDP datagrams echoed.", value=g.sentBytes)
        dropped = CounterMetricFamily("echoplug_udp_datagrams_dropped",
                                      "UDP datagrams not echoed, by reason.", labels=["reason"])
        for reason, n in g.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped


def makeRegistry(factory: Any, reactor: Any, guards: Any = None,
                 extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """
    A registry of its own (not prometheus_client's global one, so two
    services in one process do not collide) with the echo metrics, any
    C{extra} collectors and the usual process, platform and GC metrics (the
    process ones from L{ProcessStats}).
    """
    registry = CollectorRegistry()
    registry.register(EchoCollector(factory, reactor))
    registry.register(ProcessStats())
    if guards is not None:
        registry.register(DatagramCollector(guards))
    for collector in extra:
        registry.register(collector)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class WorkersCollector(Collector):
    """
    Under C{--workers}: the totals come from L{EchoCollector} (the parent's
    factory is every worker's books summed, L{echoplug.books.Totals}); this
    adds the workers themselves, by C{worker} label. A worker's own counter
    starts again from 0 when it is restarted, as a restarted process's
    counters do (Prometheus' rate() expects that); the totals never go back.
    """

    def __init__(self, arbiter: Any) -> None:
        self.arbiter = arbiter

    def collect(self) -> Iterator[Metric]:
        a = self.arbiter
        up = GaugeMetricFamily("echoplug_worker_up",
                               "1 while the worker runs and accepts, else 0.", labels=["worker"])
        restarts = CounterMetricFamily("echoplug_worker_restarts",
                                       "Times the worker was restarted after dying.",
                                       labels=["worker"])
        accepted = CounterMetricFamily(
            "echoplug_worker_connections_accepted",
            "Connections the worker accepted since it (re)started.", labels=["worker"])
        opened = GaugeMetricFamily("echoplug_worker_connections_open",
                                   "Connections open in the worker now.", labels=["worker"])
        for slot, values in a.factory.bySlot():
            label = [str(slot + 1)]
            proto = a.workers.get(slot + 1)
            alive = proto is not None and proto.listening and not proto.ended
            up.add_metric(label, 1 if alive else 0)
            restarts.add_metric(label, a.restarts.get(slot + 1, 0))
            accepted.add_metric(label, values["accepted"])
            opened.add_metric(label, values["open"])
        yield GaugeMetricFamily("echoplug_workers", "Worker processes configured (--workers).",
                                value=a.count)
        yield from (up, restarts, accepted, opened)


class MetricsPage(Resource):
    """
    C{GET} or C{HEAD} of C{/metrics}: the registry in Prometheus (or
    OpenMetrics) text. Not a leaf, and without children: C{/metrics/} and
    below are 404 (L{Resource.getChild}).
    """

    allowedMethods = (b"GET", b"HEAD")

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: Request) -> bytes:
        # Resource.render answers 405 only for the methods twisted.web knows
        # (GET, HEAD, POST), and 501 for the rest: here every other is 405.
        if request.method not in self.allowedMethods:
            request.setResponseCode(405)
            request.setHeader("allow", "GET, HEAD")
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"/metrics answers GET and HEAD only\n"
        return super().render(request)  # type: ignore[no-any-return]

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, contentType = choose_encoder(accept or "")
        request.setHeader("content-type", contentType)
        return encoder(self.registry)

    def render_HEAD(self, request: Request) -> bytes:
        # The GET's headers and length, and no body: twisted.web would log
        # a line per HEAD (naming the client's URI) if the body came back.
        body = self.render_GET(request)
        request.setHeader("content-length", b"%d" % len(body))
        return b""


#: The answer to a request that announces a body, sent before any of it is read.
BODY_REFUSED = (b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
                b"Content-Length: 0\r\n\r\n")


class MetricsChannel(HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel, bounded for a port attackers reach (see
    the module docstring): one request per connection, no body, small
    headers, and a deadline from accept to close.
    """

    maxHeaders = 32
    totalHeadersSize = 8192
    site: MetricsSite
    transport: Any  # a TCP, UNIX or TLS transport: more than ITransport says
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.open += 1
        clock: Any = self.site.reactor
        self._deadline = clock.callLater(self.site.deadline, self._timedOut)

    def _timedOut(self) -> None:
        self._deadline = None
        self.site.warn("timeout", "metrics: closed {peer} at the {deadline:g}s deadline",
                       peer=formatAddress(self.transport.getPeer()),
                       deadline=self.site.deadline)
        self.transport.abortConnection()

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        # One request per connection: twisted.web closes after the answer,
        # stops reading, and drops whatever else was sent, unparsed.
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def allHeadersReceived(self) -> None:
        # Called at the end of the headers, before any body is read; the
        # body is never read: once the transport is disconnecting,
        # LineReceiver hands nothing more to the channel.
        headers = self.requests[-1].requestHeaders
        length = headers.getRawHeaders(b"content-length")
        if headers.hasHeader(b"transfer-encoding") or (length and length != [b"0"]):
            self.site.warn("body", "metrics: refused a request with a body from {peer}",
                           peer=formatAddress(self.transport.getPeer()))
            self.transport.write(BODY_REFUSED)
            self.loseConnection()
            return
        super().allHeadersReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.site.open -= 1
        super().connectionLost(reason)


class MetricsSite(Site):
    """
    The metrics site: L{MetricsChannel}s (plain HTTP/1.1, never HTTP/2), at
    most L{maxConnections} at once, no access line per scrape, and at most
    one warning a second (L{warn}).

    @ivar counts: events by kind (C{refused}, C{timeout}, C{body}).
    @ivar open: metrics connections open now.
    """

    protocol = MetricsChannel  # type: ignore[assignment]  # not a _GenericHTTPChannelProtocol
    noisy = False
    # Not "log": Site.log is twisted.web's access log, silenced below.
    warnings = Logger()
    #: Connections open at once; more are closed at accept. Well inside the
    #: descriptors that L{EchoService} keeps back from echo connections.
    maxConnections = 16
    #: Seconds from accept to close, for any connection. A scrape of
    #: echoplug is rendered in milliseconds and is a few KiB.
    deadline = 5.0
    #: At most one warning per this many seconds; the rest are counted.
    warnInterval = 1.0

    def __init__(self, root: Resource, reactor: Any) -> None:
        super().__init__(root, timeout=None, reactor=reactor)
        self.open = 0
        self.counts = {"refused": 0, "timeout": 0, "body": 0}
        self._lastWarn = -1e9
        self._suppressed = 0

    def buildProtocol(self, addr: IAddress) -> MetricsChannel | None:  # type: ignore[override]
        if self.open >= self.maxConnections:
            # None: the listening port closes the socket at once.
            self.warn("refused", "metrics: refused {peer}: at {cap} metrics connections",
                      peer=formatAddress(addr), cap=self.maxConnections)
            return None
        channel: MetricsChannel = super().buildProtocol(addr)
        return channel

    def warn(self, kind: str, format: str, **fields: Any) -> None:
        """Count an event of C{kind}; log it unless a warning went out in the last second."""
        self.counts[kind] += 1
        clock: Any = self.reactor
        now = clock.seconds()
        if now - self._lastWarn < self.warnInterval:
            self._suppressed += 1
            return
        n, self._suppressed = self._suppressed, 0
        self._lastWarn = now
        self.warnings.warn(format + "{more}", more=f" ({n} more metrics-port events since)" if n
                      else "", **fields)

    def log(self, request: Request) -> None:
        pass


def makeSite(factory: Any, reactor: Any, guards: Any = None,
             extra: Iterable[Collector] = ()) -> MetricsSite:
    """
    The metrics site for C{factory} (an L{EchoFactory}, or the summed books
    of every worker under C{--workers}, L{echoplug.books.Totals}):
    C{/metrics}, and 404 for every other path.
    """
    root = Resource()
    registry = makeRegistry(factory, reactor, guards, extra)
    root.putChild(b"metrics", MetricsPage(registry))
    site = MetricsSite(root, reactor)
    registry.register(MetricsPortCollector(site))
    return site


class MetricsListener(Listener):
    """
    Serve the metrics site (L{makeSite}) on one endpoint. A L{Listener}, so it binds
    before privileges drop, a port in use is one line, and
    L{EchoService.whenListening} (hence C{READY=1}) waits for it too.
    """

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info("serving metrics on {address} at /metrics",
                      address=formatAddress(port.getHost()))
        self.ready.callback(port)
