# -*- test-case-name: tests.test_metrics -*-
"""
C{--metrics}: Prometheus text at C{/metrics}, read from the factory's books.

This module imports prometheus_client (the C{metrics} extra), so only
L{echoplug.tap} imports it, and only when C{--metrics} is given: never the
dropin, never C{import echoplug}.

The numbers are the counters L{EchoFactory} already keeps; L{EchoCollector}
reads them when Prometheus scrapes, so serving metrics adds no work per
message or per connection. The page is rendered on the reactor thread, not
through C{prometheus_client.twisted.MetricsResource}, which runs the WSGI
app in the reactor's thread pool, where reading the factory's set of
connections would race the reactor that changes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IListeningPort
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from echoplug import __version__
from echoplug.factory import EchoFactory
from echoplug.logs import formatAddress
from echoplug.service import Listener, reactorName


class EchoCollector(Collector):
    """
    The echo service's metrics, computed at scrape time from the factory.

    Bytes received are what every connection has read; bytes sent are what
    it has handed to the kernel (received less what is still, or was at
    close, in its send buffer), so once every echo is flushed both counters
    have risen by exactly what was echoed.
    """

    def __init__(self, factory: EchoFactory, reactor: Any) -> None:
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
            "echoplug_received_bytes", "Bytes received from clients.",
            value=f.bytesEchoed + f.openBytes())
        yield CounterMetricFamily(
            "echoplug_sent_bytes", "Bytes echoed back (handed to the kernel).",
            value=f.bytesSent + f.openSentBytes())
        failures = CounterMetricFamily(
            "echoplug_proxy_header_failures",
            "Connections closed for a bad PROXY header, or none in time, by reason.",
            labels=["reason"])
        for reason, n in getattr(f, "headerFailures", {}).items():
            failures.add_metric([reason], n)
        yield failures
        yield InfoMetricFamily(
            "echoplug", "echoplug's version and the Twisted reactor it runs on.",
            value={"version": __version__, "reactor": self.reactor,
                   "reactor_class": self.reactorClass})


def makeRegistry(factory: EchoFactory, reactor: Any, *extra: Collector) -> CollectorRegistry:
    """
    A registry of its own (not prometheus_client's global one, so two
    services in one process do not collide) with the echo metrics, any
    C{extra} collectors and the usual process, platform and GC metrics.
    """
    registry = CollectorRegistry()
    registry.register(EchoCollector(factory, reactor))
    for collector in extra:
        registry.register(collector)
    ProcessCollector(registry=registry)
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
    """C{GET /metrics}: the registry in Prometheus (or OpenMetrics) text."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, contentType = choose_encoder(accept or "")
        request.setHeader("content-type", contentType)
        return encoder(self.registry)


class Root(Resource):
    """C{/}: a pointer to C{/metrics}, as exporters usually serve."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        child: Resource = super().getChild(path, request)
        return child

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return b"echoplug metrics: /metrics\n"


class MetricsSite(Site):
    """A L{Site} that writes no access line per scrape."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def makeSite(factory: Any, reactor: Any, *extra: Collector) -> Site:
    """
    The metrics site for C{factory}: an L{EchoFactory}, or the summed books
    of every worker under C{--workers} (L{echoplug.books.Totals}).
    """
    root = Root()
    root.putChild(b"metrics", MetricsPage(makeRegistry(factory, reactor, *extra)))
    return MetricsSite(root)


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
