# -*- test-case-name: tests.test_protocol -*-
"""
The echo protocol (RFC 862), made safe for clients that misbehave.

Stock L{twisted.protocols.wire.Echo} is three lines and has two faults that
matter to a service: it buffers without bound for a client that writes and
never reads, and it throws away the unsent tail when a client half-closes.
L{Echo} keeps the three-line data path and fixes both in C{connectionMade} and
C{readConnectionLost}. Limits, timeouts and counters live in the factory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echoplug.eager import eagerWriter, loseConnection


class Books(ServerFactory["Echo"]):
    """
    What an L{Echo} tells its factory: a connection made or lost, and how
    to name its peer. L{echoplug.factory.EchoFactory} keeps the books; the
    base class is here so that this module needs nothing from the factory's
    (which imports this one).
    """

    def connectionMade(self, proto: Echo) -> None:
        raise NotImplementedError

    def connectionLost(self, proto: Echo, reason: Failure) -> None:
        raise NotImplementedError

    def peerOf(self, transport: Any) -> str:
        raise NotImplementedError


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    Send back every byte received, at the pace the peer reads them.

    @ivar bytesIn: bytes received so far (each one is echoed).
    @ivar started: C{time.monotonic()} when the connection was made.
    @ivar closeReason: why echoplug closed the connection itself, if it did;
        the access-log line shows it instead of the transport's reason.
    @ivar send: how echoes are written: an eager C{socket.send} on a plain
        TCP transport, else C{transport.write} (see L{echoplug.eager}).
    """

    factory: Books
    # A tcp.Server, unix.Server or TLS transport: no one Twisted interface
    # names all it is asked for here (registerProducer, abortConnection,
    # getPeer), and Protocol types it as ITransport | None.
    transport: Any
    bytesIn = 0
    started = 0.0
    closeReason: str | None = None
    send: Callable[[bytes], None]
    # Book-keeping for the factory's limits, as class defaults so that a
    # connection costs no more unless a limit is on.
    peerHost: str | None = None  # the key in factory.perPeer, under a per-peer cap
    counted = True  # False if refused in connectionMade (the select wall)
    idleMark: tuple[int, int] = (0, 0)  # (bytesIn, unsent bytes) at the last sweep
    idleSince: float | None = None  # when idleMark last changed
    # Under the PROXY protocol (echoplug.proxied): served only once the
    # header is read; the client it names, and the balancer it came through.
    admitted = True
    client: IPv4Address | IPv6Address | None = None  # None: the transport's peer
    via: IAddress | None = None

    def connectionMade(self) -> None:
        # The transport is its own streaming producer: when its send buffer
        # fills, it pauses itself and so stops reading, so a client that
        # writes and never reads cannot grow the server (as in portforward.py).
        self.transport.registerProducer(self.transport, True)
        self.send = eagerWriter(self.transport)
        self.started = time.monotonic()
        self.factory.connectionMade(self)

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self.send(data)

    def readConnectionLost(self) -> None:
        # The peer sent EOF (shutdown(SHUT_WR)). Unregister the producer first:
        # loseConnection() waits for a registered producer, and only then
        # flushes what is buffered and closes (at once if nothing is: eager.py).
        self.transport.unregisterProducer()
        loseConnection(self.transport)

    def writeConnectionLost(self) -> None:
        # The peer will read no more; nothing we send can arrive.
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connectionLost(self, reason)

    def close(self, why: str, graceful: bool = False) -> None:
        """
        Close this connection and say why in the access log. Used for
        timeouts, caps and the end of a drain.

        @param graceful: send what is buffered, then FIN, rather than abort
            at once (a reset). Only for a connection whose buffer is empty
            or draining: loseConnection() waits for the buffer to flush.
        """
        if self.closeReason is None:
            self.closeReason = why
        if graceful:
            # loseConnection() waits while a producer is registered.
            self.transport.unregisterProducer()
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()


class TracingEcho(Echo):
    """
    L{Echo} that logs every event, the way the original select() server
    printed them: "connection from", "received ... from", "sending ... to",
    "closing". Chosen by C{--trace}; never on the fast path otherwise.
    """

    log = Logger()

    def connectionMade(self) -> None:
        self.peer = self.factory.peerOf(self.transport)
        self.log.info("connection from {peer}", peer=self.peer)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.log.info("received {data!r} from {peer}", data=data, peer=self.peer)
        self.log.info("sending {data!r} to {peer}", data=data, peer=self.peer)
        super().dataReceived(data)

    def readConnectionLost(self) -> None:
        self.log.info("closing {peer} after reading no data", peer=self.peer)
        super().readConnectionLost()
