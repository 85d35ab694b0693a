# -*- test-case-name: tests.test_client -*-
"""
C{echoplug-client}: the original multi-socket chunked echo client, on Twisted.

With no options it does what the original did: open two sockets to
localhost:10000 and, for each of three messages, send it on every socket,
then read the answer on every socket, printing::

    ('127.0.0.1', 50012): sending "This is the message. "
    ('127.0.0.1', 50012): received "This is the message. "

Unlike the original, which printed whatever one C{recv(1024)} returned, it
waits until the whole echo is back (TCP may split it), checks every byte,
and exits 0 only if everything matched. A refused connection, a timeout or a
mismatch is one line on stderr and exit status 1; a bad option is status 2.

With C{--udp} it sends each message as one datagram from each of
C{--connections} UDP sockets, and waits for each echo: a datagram that does
not come back is sent again, up to C{--retries} times, the attempts spread
over C{--timeout} seconds. The lines printed are the same; a datagram that
never came back (or an ICMP "port unreachable") is one line and status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IConnector, ITCPTransport
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.python.failure import Failure

from echoplug.reactors import install

MESSAGES = ["This is the message. ", "It will be sent ", "in parts."]
#: The largest UDP payload over IPv4.
MAX_DATAGRAM = 65507


class ClientError(Exception):
    """A failure to report as one line: refused, timed out, cut or mismatched."""


class EchoClient(Protocol):
    """
    One client socket: collects what comes back and hands out exactly the
    number of bytes that was asked for.
    """

    factory: EchoClientFactory
    transport: ITCPTransport

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiting: tuple[int, defer.Deferred[bytes]] | None = None
        self.closed: Failure | None = None

    name = "(unconnected)"

    def connectionMade(self) -> None:
        # The local address, as the original printed getsockname().
        host = self.transport.getHost()
        assert isinstance(host, IPv4Address | IPv6Address)
        self.name = repr((host.host, host.port))
        self.factory.connected.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def connectionLost(self, reason: Failure = Failure(ConnectError())) -> None:  # noqa: B008
        self.closed = reason
        self._check()

    def expect(self, count: int) -> defer.Deferred[bytes]:
        """Fire with the next C{count} bytes, once that many have arrived."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting = (count, d)
        self._check()
        return d

    def _check(self) -> None:
        if self.waiting is None:
            return
        count, d = self.waiting
        if d.called:  # cancelled by the timeout
            self.waiting = None
        elif len(self.buffer) >= count:
            self.waiting = None
            data = bytes(self.buffer[:count])
            del self.buffer[:count]
            d.callback(data)
        elif self.closed is not None:
            self.waiting = None
            d.errback(ClientError(
                f"{self.name}: connection closed after {len(self.buffer)} of {count} bytes"
            ))


class EchoClientFactory(ClientFactory["EchoClient"]):
    """
    Make one L{EchoClient}; C{connected} fires with it, or fails with a
    L{ClientError} if the connection cannot be made.
    """

    protocol = EchoClient
    noisy = False

    def __init__(self, where: str) -> None:
        self.where = where
        self.connected: defer.Deferred[EchoClient] = defer.Deferred()

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        why = reason.getErrorMessage().rstrip(".")
        errno = getattr(reason.value, "osError", None)
        if isinstance(errno, int):
            why = os.strerror(errno)  # "Connection refused", not "111"
        self.connected.errback(ClientError(f"cannot connect to {self.where}: {why}"))


def brief(data: bytes) -> str:
    """C{data} for a one-line error: its repr, or the start of it and its size."""
    return repr(data) if len(data) <= 60 else f"{data[:40]!r}... ({len(data)} bytes)"


def show(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


async def converse(reactor: Any, options: argparse.Namespace) -> None:
    """
    Run the original client's conversation: every message on every socket,
    then every answer, checked byte for byte.
    """
    where = f"{options.host}:{options.port}"
    clients: list[EchoClient] = []
    try:
        for _ in range(options.connections):
            factory = EchoClientFactory(where)
            reactor.connectTCP(options.host, options.port, factory, timeout=options.timeout)
            clients.append(await factory.connected)
        for message in options.message:
            payload = message.encode("utf-8")
            for c in clients:
                print(f'{c.name}: sending "{message}"')
                c.transport.write(payload)
            for c in clients:
                echoed = await c.expect(len(payload))
                print(f'{c.name}: received "{show(echoed)}"')
                if echoed != payload:
                    raise ClientError(
                        f"{c.name}: echo mismatch: sent {payload!r}, received {echoed!r}"
                    )
    finally:
        for c in clients:
            c.transport.loseConnection()


class DatagramClient(DatagramProtocol):
    """
    One UDP socket, connected to the server, so the kernel lets through only
    the server's datagrams (and reports its ICMP "port unreachable").
    Datagrams are queued as they arrive; L{next} hands them out one by one.
    """

    noisy = False
    name = "(unbound)"
    port: Any = None  # the reactor's UDP port (its transport)

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.queue: list[bytes] = []
        self.waiting: defer.Deferred[bytes | None] | None = None
        self.refused = False
        self.stopping = False

    def connect(self, host: str, port: int) -> None:
        """Connect to the server; name the socket by its local address then."""
        self.port.connect(host, port)
        local = self.port.getHost()
        self.name = repr((local.host, local.port))

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.queue.append(datagram)
        self._wake()

    def connectionRefused(self) -> None:
        self.refused = True
        self._wake()

    def stopProtocol(self) -> None:
        # The epoll and poll reactors close a connected UDP socket whose ICMP
        # error is pending (EPOLLERR without EPOLLIN) instead of reporting
        # connectionRefused, as the select reactor does.
        if not self.stopping:
            self.connectionRefused()

    def _wake(self) -> None:
        d, self.waiting = self.waiting, None
        if d is not None and not d.called:
            d.callback(self.queue.pop(0) if self.queue else None)

    def next(self, timeout: float) -> defer.Deferred[bytes | None]:
        """The next datagram, or C{None} after C{timeout} seconds or if refused."""
        if self.queue:
            return defer.succeed(self.queue.pop(0))
        if self.refused:
            return defer.succeed(None)
        d: defer.Deferred[bytes | None] = defer.Deferred()
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda result, timeout: None)
        self.waiting = d
        return d


async def exchange(c: DatagramClient, payload: bytes, earlier: set[bytes],
                   options: argparse.Namespace) -> bytes:
    """
    Send C{payload} and wait for its echo, sending it again up to
    C{options.retries} times. A late echo of an earlier message (one that
    was sent twice) is skipped; anything else is a mismatch.
    """
    where = f"{options.host}:{options.port}"
    wait = options.timeout / (options.retries + 1)
    refused = ClientError(f"{c.name}: {where} answered port unreachable: "
                          "nothing listens for UDP there")
    for _ in range(options.retries + 1):
        if c.refused:
            raise refused
        c.port.write(payload)
        deadline = c.reactor.seconds() + wait
        while (left := deadline - c.reactor.seconds()) > 0:
            echoed = await c.next(left)
            if c.refused:
                raise refused
            if echoed is None:
                break
            if echoed == payload:
                return echoed
            if echoed not in earlier:
                raise ClientError(f"{c.name}: echo mismatch: sent {brief(payload)}, "
                                  f"received {brief(echoed)}")
    raise ClientError(f"{c.name}: lost: no echo of {brief(payload)} from {where} after "
                      f"{options.retries} resends in {options.timeout:g}s")


async def converseUDP(reactor: Any, options: argparse.Namespace) -> None:
    """L{converse} over UDP: every message as a datagram from every socket."""
    host = options.host
    if not (isIPAddress(host) or isIPv6Address(host)):
        host = await reactor.resolve(host)
    clients: list[DatagramClient] = []
    try:
        for _ in range(options.connections):
            c = DatagramClient(reactor)
            # maxPacketSize: Twisted's default of 8192 would truncate the echo.
            c.port = reactor.listenUDP(0, c, interface="::" if isIPv6Address(host) else "",
                                       maxPacketSize=MAX_DATAGRAM + 28)
            clients.append(c)
            c.connect(host, options.port)
        earlier: set[bytes] = set()
        for message in options.message:
            payload = message.encode("utf-8")
            for c in clients:
                print(f'{c.name}: sending "{message}"')
            # All at once, each with its own deadline; then in socket order.
            results = await defer.DeferredList(
                [defer.ensureDeferred(exchange(c, payload, earlier, options)) for c in clients],
                consumeErrors=True)
            for c, (ok, echoed) in zip(clients, results, strict=True):
                if not ok:
                    failure: Any = echoed
                    raise failure.value
                print(f'{c.name}: received "{show(echoed)}"')
            earlier.add(payload)
    finally:
        for c in clients:
            c.stopping = True
            if c.port.connected:
                c.port.stopListening()


def parseArgs(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="echoplug-client",
        description="Send messages on several sockets to an echo server and check "
        "every byte that comes back. Exit 0 only if all of it matched.",
    )
    parser.add_argument("--host", default="localhost", help="server host [localhost]")
    parser.add_argument("--port", type=portNumber, default=10000, help="server port [10000]")
    parser.add_argument("--connections", type=positiveInt, default=2,
                        help="sockets to open [2]")
    parser.add_argument("--message", action="append",
                        help="a message to send (repeatable) [the original three]")
    parser.add_argument("--reactor", default=None,
                        help="Twisted reactor: select, poll, epoll, asyncio [default]")
    parser.add_argument("--timeout", type=positiveFloat, default=10.0,
                        help="give up after this many seconds (with --udp: for each "
                        "datagram, resends included) [10]")
    parser.add_argument("--udp", action="store_true",
                        help="send each message as a UDP datagram, not over TCP")
    parser.add_argument("--retries", type=nonNegativeInt, default=3,
                        help="with --udp: resend a datagram that did not come back "
                        "up to this many times [3]")
    options = parser.parse_args(argv)
    if options.message is None:
        options.message = list(MESSAGES)
    if any(m == "" for m in options.message):
        parser.error("--message: an empty message cannot be echoed")
    if options.udp and any(len(m.encode("utf-8")) > MAX_DATAGRAM for m in options.message):
        parser.error(f"--message: a UDP datagram holds at most {MAX_DATAGRAM} bytes")
    return options


def portNumber(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def positiveInt(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def nonNegativeInt(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 0")
    return int(text)


def positiveFloat(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    options = parseArgs(argv)
    reactor = install(options.reactor, prog="echoplug-client")
    outcome: list[BaseException] = []

    def failed(f: Failure) -> None:
        assert f.value is not None
        outcome.append(f.value)

    def run(reactor: Any) -> defer.Deferred[None]:
        if options.udp:
            # Each datagram has its own deadline (exchange), resends included.
            d = defer.ensureDeferred(converseUDP(reactor, options))
        else:
            d = defer.ensureDeferred(converse(reactor, options))
            d.addTimeout(options.timeout, reactor)
        d.addErrback(failed)
        return d

    from twisted.internet.task import react

    try:
        react(run, [], _reactor=reactor)
    except SystemExit as e:
        if e.code not in (0, None):
            outcome.append(e)
    if outcome:
        error = outcome[0]
        if isinstance(error, defer.TimeoutError):
            why = f"timed out after {options.timeout:g}s waiting for {options.host}:{options.port}"
        elif isinstance(error, ClientError):
            why = str(error)
        else:
            why = f"{type(error).__name__}: {error}"
        print(f"echoplug-client: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
