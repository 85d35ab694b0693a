# -*- test-case-name: tests.test_factory -*-
"""
The factory: builds L{Echo} protocols and keeps the books on open connections.

Everything that is per-server rather than per-byte lives here, beside the
protocol rather than inside it: the set of open connections (for draining),
the counters, and the access log written when a connection closes.
"""

from __future__ import annotations

import time

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, ITransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from echoplug.logs import LEVELS, formatAddress
from echoplug.protocol import Echo, TracingEcho


class EchoFactory(ServerFactory):
    """
    Build echo protocols and account for them.

    @ivar connections: the open connections.
    @ivar accepted: connections served since start.
    @ivar bytesEchoed: bytes received on closed connections (each one was
        echoed back, unless the connection was cut first); add
        C{openBytes()} for the total including open ones.
    @ivar bytesSent: bytes sent on closed connections: what they received
        less what was still unsent when they closed (an aborted or reset
        connection drops its buffer). Counted once per connection, at close,
        so the per-message path stays as it is.
    """

    log = Logger(namespace="echoplug")
    noisy = False  # no "Starting factory" lines: the service logs its own.

    def __init__(self, trace: bool = False, logLevel: str = "info") -> None:
        self.protocol = TracingEcho if trace else Echo
        level = LEVELS[logLevel]
        # Decided once, so the per-connection path tests a bool, not a level.
        self.logOpen = level <= LEVELS["debug"]
        self.logClose = level <= LEVELS["info"]
        self.connections: set[Echo] = set()
        self.accepted = 0
        self.bytesEchoed = 0
        self.bytesSent = 0

    def buildProtocol(self, addr: IAddress) -> Echo | None:
        p = self.protocol()
        p.factory = self
        return p

    def connectionMade(self, proto: Echo) -> None:
        self.connections.add(proto)
        self.accepted += 1
        if self.logOpen:
            self.log.debug("open {peer}", peer=self.peerOf(proto.transport))

    def connectionLost(self, proto: Echo, reason: Failure) -> None:
        self.connections.discard(proto)
        self.bytesEchoed += proto.bytesIn
        self.bytesSent += proto.bytesIn - unsentBytes(proto.transport)
        if self.logClose:
            self.log.info(
                "close {peer} after {duration:.3f}s, {bytes} bytes echoed, {why}",
                peer=self.peerOf(proto.transport),
                duration=time.monotonic() - proto.started,
                bytes=proto.bytesIn,
                why=proto.closeReason or describeReason(reason),
            )

    def openBytes(self) -> int:
        """Bytes received so far on the connections still open."""
        return sum(p.bytesIn for p in self.connections)

    def openSentBytes(self) -> int:
        """Bytes sent so far on the connections still open."""
        return sum(p.bytesIn - unsentBytes(p.transport) for p in self.connections)

    @staticmethod
    def peerOf(transport: ITransport) -> str:
        return formatAddress(transport.getPeer())


def unsentBytes(transport: object) -> int:
    """
    Bytes written to C{transport} that it has not yet handed to the kernel.

    Twisted's socket transports (L{twisted.internet.abstract.FileDescriptor},
    under every reactor echoplug runs on) keep them in C{dataBuffer} from
    C{offset} on, plus C{_tempDataLen} bytes not yet joined to it; both
    survive C{connectionLost}, so this works at close time too. A TLS
    transport keeps plaintext not yet given to OpenSSL in C{_appSendBuffer}.
    """
    buffered = getattr(transport, "dataBuffer", None)
    if buffered is not None:
        return (len(buffered) - getattr(transport, "offset", 0)
                + getattr(transport, "_tempDataLen", 0))
    pending = getattr(transport, "_appSendBuffer", None)
    if pending:
        return sum(len(chunk) for chunk in pending)
    return 0


def describeReason(reason: Failure) -> str:
    """A few words for why a connection ended, for the access log."""
    if reason.check(ConnectionDone):
        return "closed"
    if reason.check(ConnectionLost):
        return "lost"
    return reason.getErrorMessage()
