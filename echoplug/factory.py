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
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from echoplug.logs import LEVELS, LogLine, formatAddress
from echoplug.protocol import Echo, TracingEcho


class EchoFactory(ServerFactory):
    """
    Build echo protocols and account for them.

    @ivar connections: the open connections.
    @ivar accepted: connections served since start.
    @ivar bytesEchoed: bytes received on closed connections (each one was
        echoed back, unless the connection was cut first); add
        C{openBytes()} for the total including open ones.
    """

    log = Logger(namespace="echoplug")
    noisy = False  # no "Starting factory" lines: the service logs its own.

    def __init__(self, trace: bool = False, logLevel: str = "info") -> None:
        self.protocol = TracingEcho if trace else Echo
        level = LEVELS[logLevel]
        # Decided once, so the per-connection path tests a bool, not a level.
        self.logOpen = level <= LEVELS["debug"]
        self.logClose = level <= LEVELS["info"]
        # The access log: one line per connection, built cheaply (LogLine).
        self.openLine = LogLine(self.log, LogLevel.debug, "open {peer}")
        self.closeLine = LogLine(
            self.log, LogLevel.info,
            "close {peer} after {duration:.3f}s, {bytes} bytes echoed, {why}")
        self.connections: set[Echo] = set()
        self.accepted = 0
        self.bytesEchoed = 0

    def buildProtocol(self, addr: IAddress) -> Echo | None:
        p = self.protocol()
        p.factory = self
        return p

    def connectionMade(self, proto: Echo) -> None:
        self.connections.add(proto)
        self.accepted += 1
        if self.logOpen:
            self.openLine(peer=self.peerOf(proto.transport))

    def connectionLost(self, proto: Echo, reason: Failure) -> None:
        self.connections.discard(proto)
        self.bytesEchoed += proto.bytesIn
        if self.logClose:
            self.closeLine(
                peer=self.peerOf(proto.transport),
                duration=time.monotonic() - proto.started,
                bytes=proto.bytesIn,
                why=proto.closeReason or describeReason(reason),
            )

    def openBytes(self) -> int:
        """Bytes received so far on the connections still open."""
        return sum(p.bytesIn for p in self.connections)

    @staticmethod
    def peerOf(transport: ITransport) -> str:
        return formatAddress(transport.getPeer())


def describeReason(reason: Failure) -> str:
    """A few words for why a connection ended, for the access log."""
    if reason.check(ConnectionDone):
        return "closed"
    if reason.check(ConnectionLost):
        return "lost"
    return reason.getErrorMessage()
