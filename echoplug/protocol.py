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
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echoplug.eager import eagerWriter, loseConnection

if TYPE_CHECKING:
    from echoplug.buffers import BufferBound


class Books(ServerFactory["Echo"]):
    """
    What an L{Echo} tells its factory: a connection made or lost, and how
    to name its peer. L{echoplug.factory.EchoFactory} keeps the books; the
    base class is here so that this module needs nothing from the factory's
    (which imports this one).
    """

    #: The bound on bytes held over all connections (--max-buffered), if any.
    bound: BufferBound | None = None

    def connectionMade(self, proto: Echo) -> None:
        raise NotImplementedError

    def connectionLost(self, proto: Echo, reason: Failure) -> None:
        raise NotImplementedError

    def peerOf(self, transport: Any) -> str:
        raise NotImplementedError


@implementer(IHalfCloseableProtocol, IPushProducer)
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
    idleMark: tuple[int, int] = (0, 0)  # (bytesIn, unsent bytes) at the last check
    idleSince = 0  # the idle sweep's generation when idleMark last changed
    idleSlot = -1  # the idle sweep's bucket that holds this connection
    held = 0  # bytes counted against --max-buffered (factory.bound)
    # Under the PROXY protocol (echoplug.proxied): served only once the
    # header is read; the client it names, and the balancer it came through.
    admitted = True
    client: IPv4Address | IPv6Address | None = None  # None: the transport's peer
    via: IAddress | None = None

    def connectionMade(self) -> None:
        # The protocol is the transport's streaming producer: when the send
        # buffer fills, the transport pauses it and it stops the transport
        # reading, so a client that writes and never reads cannot grow the
        # server (as portforward.py wires two transports). Pausing and
        # resuming pass through here so that the buffer bound hears of them.
        self.transport.registerProducer(self, True)
        bound = self.factory.bound
        self.send = eagerWriter(self.transport,
                                None if bound is None else self._queued)
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

    # IPushProducer, called by the transport (and by the buffer bound).

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()
        if self.factory.bound is not None:
            self.factory.bound.paused(self)

    def resumeProducing(self) -> None:
        # The send buffer is empty.
        if self.factory.bound is not None:
            self.factory.bound.drained(self)
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The connection is gone; connectionLost does the books.
        pass

    def _queued(self) -> None:
        # The eager write has just left bytes in an empty send buffer.
        assert self.factory.bound is not None
        self.factory.bound.queued(self)

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
