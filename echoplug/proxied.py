# -*- test-case-name: tests.test_proxied -*-
"""
Echo behind a load balancer: the PROXY protocol (C{--proxy-protocol}).

L{ProxyEcho} is L{Echo} whose first reads go to a
L{echoplug.proxyheader.HeaderParser}. Once the header is read, the client
it names is the connection's peer for the access log, the trace and the
per-peer cap, and the protocol switches to L{Echo}'s own C{dataReceived}
by binding it on the instance: from then on each message takes exactly
the plain echo's path, with no test of a flag. The header is never echoed;
the bytes after it are echoed as if they had just arrived.

It is a subclass, not a C{ProtocolWrapper} (as C{twisted.protocols.haproxy}
is), so half-close, the transport-as-producer backpressure and the eager
write all see the real transport, and C{connectionMade} runs once.

The header deadline is one C{callLater} per connection, cancelled when the
header is complete (nearly always on the first read). The idle sweep was
the alternative: it would have to run even without C{--idle-timeout} and
walk every connection on each pass, and would close late by up to a sweep
interval; the timer costs a heap push and a cancel per connection and
nothing per message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from echoplug.logs import formatAddress
from echoplug.protocol import Echo, TracingEcho
from echoplug.proxyheader import HeaderParser, ProxyHeaderError, Result

if TYPE_CHECKING:
    from echoplug.factory import EchoFactory


class ProxyEcho(Echo):
    """
    L{Echo} after a PROXY header (required mode), or after one if the
    connection starts with a signature (optional mode; otherwise its first
    bytes are plain data, echoed).

    @ivar parser: assembles the header; C{None} once it is decided.
    @ivar deadline: the header timeout's call, while it is pending.
    """

    factory: EchoFactory  # the PROXY settings and admit() are the factory's own
    admitted = False
    parser: HeaderParser | None = None
    deadline: Any = None

    def connectionMade(self) -> None:
        factory = self.factory
        self.parser = HeaderParser(optional=factory.proxyProtocol == "optional")
        super().connectionMade()
        if factory.proxyTimeout and self.counted:
            self.deadline = factory.clock.callLater(factory.proxyTimeout, self.headerTimeout)

    def dataReceived(self, data: bytes) -> None:
        # Only until the header is decided: headerDone() rebinds the plain path.
        try:
            result = self.parser.feed(data)  # type: ignore[union-attr]
        except ProxyHeaderError as e:
            self.headerFailed(e.reason, str(e))
            return
        if result is not None:
            self.headerDone(result)

    def headerDone(self, result: Result) -> None:
        """The header is read, or there is none: serve the connection."""
        self.parser = None
        self._cancelDeadline()
        header = result.header
        if header is not None and header.source is not None:
            self.client = header.source
            transport: Any = self.transport
            self.via = transport.getPeer()
        # From now on each read takes the parent's path (Echo's, or the
        # trace's): an attribute of the instance wins over the class's method.
        self.dataReceived = super().dataReceived  # type: ignore[method-assign]
        if self.factory.admit(self) and result.rest:
            self.dataReceived(result.rest)

    def headerFailed(self, reason: str, why: str) -> None:
        self.parser = None
        self._cancelDeadline()
        self.factory.headerFailed(self, reason, why)
        self.close(f"bad PROXY header: {reason}")

    def headerTimeout(self) -> None:
        self.deadline = None
        self.headerFailed("timeout", f"no PROXY header within {self.factory.proxyTimeout:g}s")

    def readConnectionLost(self) -> None:
        if self.parser is not None:
            # EOF before the header was decided: in optional mode a prefix
            # of a signature is plain data, to be echoed; else it failed.
            try:
                result = self.parser.end()
            except ProxyHeaderError as e:
                self.headerFailed(e.reason, str(e))
                return
            self.headerDone(result)
        if self.admitted:
            super().readConnectionLost()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.parser is not None:
            # Gone (reset, or closed by the drain) within its header.
            self.parser = None
            self._cancelDeadline()
            if self.counted:
                self.factory.headerFailed(self, "incomplete", "closed within the PROXY header")
        super().connectionLost(reason)

    def _cancelDeadline(self) -> None:
        if self.deadline is not None:
            if self.deadline.active():
                self.deadline.cancel()
            self.deadline = None


class TracingProxyEcho(ProxyEcho, TracingEcho):
    """L{ProxyEcho} with C{--trace}: the trace names the header's client."""

    def headerDone(self, result: Result) -> None:
        header = result.header
        if header is None:
            what = "none: plain echo"
        elif header.local:
            what = f"v{header.version} LOCAL"
        elif header.source is None:
            what = f"v{header.version} without addresses"
        else:
            what = f"v{header.version} for {formatAddress(header.source)}"
        self.log.info("PROXY header from {peer}: {what}", peer=self.peer, what=what)
        if header is not None and header.source is not None:
            self.peer = f"{formatAddress(header.source)} via {self.peer}"
        super().headerDone(result)
