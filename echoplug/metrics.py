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


def makeRegistry(factory: EchoFactory, reactor: Any, guards: Any = None) -> CollectorRegistry:
    """
    A registry of its own (not prometheus_client's global one, so two
    services in one process do not collide) with the echo metrics and the
    usual process, platform and GC metrics.
    """
    registry = CollectorRegistry()
    registry.register(EchoCollector(factory, reactor))
    if guards is not None:
        registry.register(DatagramCollector(guards))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


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


def makeSite(factory: EchoFactory, reactor: Any, guards: Any = None) -> Site:
    root = Root()
    root.putChild(b"metrics", MetricsPage(makeRegistry(factory, reactor, guards)))
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
