"""
Tests of L{echoplug.eager}: the eager write and the immediate close, on real
loopback and UNIX sockets in-process (pytest-twisted), and end to end through
twistd over UNIX sockets. The Twisted internals they rely on are pinned in
tests/test__twisted.py.
"""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, tcp, threads
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from echoplug.eager import eagerWriter, loseConnection
from tests.support import REACTORS, halfCloseOn, recvAll, twistd


class Held(protocol.Protocol):
    """A server protocol that does nothing, so the test drives its transport."""

    lost: Failure | None = None

    def connectionMade(self) -> None:
        self.factory.made.callback(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class Pair:
    """A server transport accepted by the running reactor and its client socket."""

    proto: Held
    client: socket.socket
    port: Any

    @property
    def transport(self) -> Any:
        return self.proto.transport

    def close(self) -> defer.Deferred[None]:
        self.client.close()
        if self.proto.lost is None:
            self.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)


@defer.inlineCallbacks
def accepted(path: str | None = None) -> Generator[Any, Any, Pair]:
    """Listen (TCP on 127.0.0.1, or UNIX at C{path}), connect a socket, wait for the accept."""
    factory = protocol.ServerFactory.forProtocol(Held)
    factory.made = defer.Deferred()
    pair = Pair()
    if path is None:
        pair.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        pair.client = socket.create_connection(("127.0.0.1", pair.port.getHost().port))
    else:
        pair.port = reactor.listenUNIX(path, factory)
        pair.client = socket.socket(socket.AF_UNIX)
        pair.client.connect(path)
    pair.client.settimeout(10)
    pair.proto = yield factory.made
    return pair


def recvExactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(1 << 16, n - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def recvUntilClosed(sock: socket.socket) -> bytes:
    try:
        return recvAll(sock)
    except ConnectionResetError:
        return b""


# Which transports get the eager path.


def test_plain_write_for_other_transports() -> None:
    t = StringTransport()
    assert eagerWriter(t) == t.write


@pytest_twisted.inlineCallbacks
def test_plain_write_when_tls_or_subclass():
    pair = yield accepted()
    try:
        t = pair.transport
        assert eagerWriter(t) != t.write
        t.TLS = True  # as startTLS() leaves it: writes must go through TLS
        assert eagerWriter(t) == t.write
        del t.TLS

        class Wrapped(tcp.Server):
            pass

        t.__class__ = Wrapped
        assert eagerWriter(t) == t.write
        t.__class__ = tcp.Server
    finally:
        yield pair.close()


# The eager write on real sockets.


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest_twisted.inlineCallbacks
def test_eager_write_sends_at_once(tmp_path, family: str):
    pair = yield accepted(str(tmp_path / "s.sock") if family == "unix" else None)
    try:
        t = pair.transport
        write = eagerWriter(t)
        write(b"hello")
        # Sent within the call: nothing buffered, no writability requested.
        assert t.dataBuffer == b"" and t._tempDataBuffer == []
        assert t not in reactor.getWriters()
        assert recvExactly(pair.client, 5) == b"hello"
    finally:
        yield pair.close()


@pytest_twisted.inlineCallbacks
def test_eager_write_keeps_backpressure_and_order():
    """
    A client that does not read: the kernel buffer fills, the remainder is
    queued by transport.write, the transport pauses itself (stops reading),
    later writes queue behind the buffer; every byte arrives in order.
    """
    pair = yield accepted()
    try:
        t = pair.transport
        t.registerProducer(t, True)
        write = eagerWriter(t)
        expected = bytearray()
        for i in range(2000):  # bounded: the kernel buffer is a few MiB at most
            chunk = bytes([i % 251]) * 65536
            write(chunk)
            expected += chunk
            if t.producerPaused:
                break
        assert t.producerPaused
        assert t not in reactor.getReaders()
        assert len(t.dataBuffer) + t._tempDataLen > t.bufferSize
        write(b"tail")
        expected += b"tail"
        assert t._tempDataBuffer[-1] == b"tail"  # queued, not sent ahead
        got = yield threads.deferToThread(recvExactly, pair.client, len(expected))
        assert got == bytes(expected)
        # Drained: FileDescriptor resumed its producer, and writes are eager again.
        assert not t.producerPaused
        assert t in reactor.getReaders()
        write(b"again")
        assert t._tempDataBuffer == []
        assert recvExactly(pair.client, 5) == b"again"
    finally:
        yield pair.close()


@pytest_twisted.inlineCallbacks
def test_eager_write_queues_behind_a_remainder():
    """
    Once part of a write is queued, later writes queue behind it even when
    the kernel has room again, so bytes never overtake each other.
    """
    pair = yield accepted()
    try:
        t = pair.transport
        write = eagerWriter(t)
        expected = bytearray()
        for i in range(20_000):  # bounded: the kernel buffers are a few MiB
            chunk = bytes([i % 251]) * 4096
            write(chunk)
            expected += chunk
            if t._tempDataBuffer:
                break
        assert t._tempDataBuffer and not t.producerPaused
        # The client reads a little: the kernel has room, the queue goes first.
        head = recvExactly(pair.client, 1 << 16)
        write(b"tail")
        expected += b"tail"
        assert t._tempDataBuffer[-1] == b"tail"
        rest = yield threads.deferToThread(recvExactly, pair.client,
                                           len(expected) - len(head))
        assert head + rest == bytes(expected)
    finally:
        yield pair.close()


@pytest_twisted.inlineCallbacks
def test_no_eager_send_after_abort():
    pair = yield accepted()
    try:
        t = pair.transport
        write = eagerWriter(t)
        t.abortConnection()
        assert t._aborting
        write(b"too late")
        # Queued where the aborted transport never sends from, not sent.
        assert t._tempDataBuffer == [b"too late"]
        assert (yield threads.deferToThread(recvUntilClosed, pair.client)) == b""
    finally:
        yield pair.close()


@pytest.mark.parametrize("close", ["loseConnection", "loseWriteConnection"])
@pytest_twisted.inlineCallbacks
def test_closing_transport_takes_the_ordinary_path(close: str):
    """After (half-)close was asked for, writes are queued and flushed first."""
    pair = yield accepted()
    try:
        t = pair.transport
        write = eagerWriter(t)
        getattr(t, close)()
        write(b"last words")
        assert t._tempDataBuffer == [b"last words"]
        assert (yield threads.deferToThread(recvUntilClosed, pair.client)) == b"last words"
    finally:
        yield pair.close()


@pytest_twisted.inlineCallbacks
def test_write_after_connection_lost_is_ignored():
    pair = yield accepted()
    try:
        t = pair.transport
        write = eagerWriter(t)
        t.connectionLost(Failure(ConnectionDone()))
        write(b"nobody")  # closed socket: falls back to write(), which ignores it
        assert pair.proto.lost is not None
    finally:
        yield pair.close()


# The immediate close.


@pytest_twisted.inlineCallbacks
def test_lose_connection_at_once_when_nothing_is_queued():
    pair = yield accepted()
    try:
        t = pair.transport
        eagerWriter(t)(b"echo")
        loseConnection(t)
        # Closed within the call, cleanly, as loseConnection would a turn later.
        assert pair.proto.lost is not None and pair.proto.lost.check(ConnectionDone)
        assert t not in reactor.getReaders() and t not in reactor.getWriters()
        assert (yield threads.deferToThread(recvUntilClosed, pair.client)) == b"echo"
    finally:
        yield pair.close()


@pytest.mark.parametrize("pending", ["buffered", "producer"])
@pytest_twisted.inlineCallbacks
def test_lose_connection_waits_for_pending(pending: str):
    pair = yield accepted()
    try:
        t = pair.transport
        if pending == "buffered":
            t.write(b"queued")
        else:
            t.registerProducer(t, True)
        loseConnection(t)
        assert pair.proto.lost is None and t.disconnecting
        if pending == "producer":
            t.unregisterProducer()
        got = yield threads.deferToThread(recvUntilClosed, pair.client)
        assert got == (b"queued" if pending == "buffered" else b"")
    finally:
        yield pair.close()


# End to end over UNIX sockets, where the eager path is also taken.


def unixHalfClose(path: str, chunks: list[bytes]) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        return halfCloseOn(s, chunks)


@pytest.mark.slow
@pytest.mark.parametrize("reactorName", [r for r in REACTORS if r in ("epoll", "echoplug-epoll")])
def test_unix_socket_half_close_and_backpressure(tmp_path, reactorName: str) -> None:
    import os

    path = tmp_path / "echo.sock"
    # The TCP port is only there for twistd()'s "listening on HOST:PORT" wait.
    with twistd(reactorName, "--port", "tcp:0:interface=127.0.0.1", "--port", f"unix:{path}",
                cwd=tmp_path) as server:
        server.waitFor(rf"listening on {path}")
        payload = os.urandom(4 << 20)
        chunks = [payload[i: i + 100_000] for i in range(0, len(payload), 100_000)]
        assert unixHalfClose(str(path), chunks) == payload
        # Never read: the server stops taking data after a bounded amount.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.setblocking(False)
            pushed = 0
            for _ in range(10_000):  # bounded
                try:
                    pushed += s.send(b"x" * 65536)
                except BlockingIOError:
                    break
            assert pushed < 64 << 20
