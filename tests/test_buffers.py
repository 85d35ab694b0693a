"""
Tests of L{echoplug.buffers}: the running total and the read size in
process, over real loopback sockets; then C{--max-buffered} through twistd,
with a thousand clients that write and never read.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from echoplug import _twisted
from echoplug.buffers import MIN_READ, BufferBound
from echoplug.factory import EchoFactory
from tests.support import rssBytes, twistd


class Transport:
    """What BufferBound reads of a socket transport."""

    def __init__(self) -> None:
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.producerPaused = False
        self.bufferSize = _twisted.DEFAULT_BUFFER_SIZE
        self.reading = True

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True


class Proto:
    held = 0

    def __init__(self) -> None:
        self.transport = Transport()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()
        bound.paused(self)  # as Echo.pauseProducing does


def test_levels() -> None:
    b = BufferBound(32 << 20, set(), task.Clock())
    assert b.levelFor(0) == 65536
    assert b.levelFor(16 << 20) == 16384
    assert b.levelFor(24 << 20) == 4096
    assert b.levelFor(32 << 20) == MIN_READ
    small = BufferBound(64 << 10, set(), task.Clock())
    assert small.levelFor(0) == 4096  # a read is never more than 1/16 of the bound


def test_counts_queued_paused_and_drained() -> None:
    global bound
    clock = task.Clock()
    protos = [Proto() for _ in range(4)]
    bound = BufferBound(256 << 10, set(protos), clock)  # levels at 128K, 192K, 256K
    top = bound.readSize
    assert top == 16384
    a, b, c, d = protos
    bound.queued(a)  # counted at its read size, and watched for the drain
    assert (a.held, bound.total, a.transport.producerPaused, a.transport.reading) == (
        top, top, True, True)
    b.transport._tempDataLen = 200_000  # its transport paused it holding this much
    b.pauseProducing()
    assert bound.total == top + 200_000 and not b.transport.reading
    # Past half the bound: everyone reads less, at once.
    assert bound.readSize == 4096
    assert all(p.transport.bufferSize == 4096 for p in protos)
    bound.queued(c)
    assert c.held == 4096  # at the read size of the moment
    c.transport._tempDataLen = 60_000
    c.pauseProducing()
    # Over the bound: the next connection to queue output stops reading.
    d.transport._tempDataLen = 100
    bound.queued(d)
    assert not d.transport.reading and d.transport.producerPaused and bound.stalls == 1
    assert d.held == 100 and bound.readSize == MIN_READ
    # Drains: counted out; the read size comes back only after relaxDelay.
    for p in (b, c, d):
        bound.drained(p)
    assert bound.total == top and bound.readSize == MIN_READ
    clock.advance(bound.relaxDelay)
    assert bound.readSize == top and all(p.transport.bufferSize == top for p in protos)
    bound.lost(a)
    assert bound.total == 0 and a.held == 0


def test_queued_after_the_transport_paused_is_not_counted_twice() -> None:
    global bound
    bound = BufferBound(32 << 20, set(), task.Clock())
    p = Proto()
    p.transport._tempDataLen = 70_000
    p.transport.producerPaused = True  # set by FileDescriptor as it paused
    p.pauseProducing()
    bound.queued(p)
    assert bound.total == 70_000


@pytest_twisted.inlineCallbacks
def test_pinned_drain_calls_resume_when_flag_set():
    """
    The premise of watchDrain, on a real socket: once producerPaused is set,
    FileDescriptor.doWrite calls the producer's resumeProducing when the
    buffer is empty, without having paused it; and bufferSize is the read
    size and the pause threshold.
    """
    from tests.test_eager import accepted

    pair = yield accepted()
    try:
        t = pair.transport
        assert type(t).bufferSize == _twisted.DEFAULT_BUFFER_SIZE == 65536
        calls = []

        class Producer:
            def resumeProducing(self) -> None:
                calls.append("resume")

            def pauseProducing(self) -> None:
                calls.append("pause")

            def stopProducing(self) -> None:
                pass

        t.registerProducer(Producer(), True)
        _twisted.setReadSize(t, 100)
        t.write(b"x" * 50)
        _twisted.watchDrain(t)
        yield task.deferLater(reactor, 0.05, lambda: None)
        assert calls == ["resume"]
        t.write(b"y" * 101)  # more than bufferSize: paused
        assert calls == ["resume", "pause"]
        t.unregisterProducer()
    finally:
        yield pair.close()


def test_factory_owns_a_bound_only_when_asked() -> None:
    assert EchoFactory().bound is None
    f = EchoFactory(maxBuffered=1 << 20, clock=task.Clock())
    assert f.bound is not None and f.bound.connections is f.connections


def pushAll(socks: list[socket.socket], seconds: float) -> int:
    """Send from every socket until none has taken anything for 1 s."""
    block = b"x" * 65536
    pushed, start, last = 0, time.monotonic(), time.monotonic()
    while time.monotonic() - start < seconds and time.monotonic() - last < 1.0:
        progress = False
        for s in socks:
            try:
                pushed += s.send(block)
                progress = True
            except BlockingIOError:
                pass
        if progress:
            last = time.monotonic()
        else:
            time.sleep(0.01)
    return pushed


@pytest.mark.slow
def test_thousand_clients_that_never_read_stay_under_the_bound(tmp_path) -> None:
    """
    1,000 clients push all they can and read nothing: with --max-buffered
    32M the server grows by at most 48 MiB (without a bound: about 95), and
    a fresh client is still echoed within 50 ms. Over a UNIX socket: the
    same code path as TCP, where loopback's send buffers (about 2.5 MB per
    connection) would take the machine's TCP memory to its limit.
    """
    path = tmp_path / "e.sock"
    with twistd(None, "--port", "tcp:0:interface=127.0.0.1", "--port", f"unix:{path}",
                "--max-buffered", "32M", cwd=tmp_path) as server:
        server.waitFor(rf"listening on {path}")
        time.sleep(0.2)
        before = rssBytes(server.pid)
        socks = []
        try:
            for _ in range(1000):
                s = socket.socket(socket.AF_UNIX)
                # Small kernel buffers on the client's side: the server's
                # user-space buffers are what is measured.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(str(path))
                s.setblocking(False)
                socks.append(s)
            assert pushAll(socks, 20) > 100 << 20
            growth = rssBytes(server.pid) - before
            with socket.socket(socket.AF_UNIX) as fresh:
                fresh.settimeout(5)
                fresh.connect(str(path))
                worst = 0.0
                for _ in range(5):
                    t = time.perf_counter()
                    fresh.sendall(b"ping")
                    assert fresh.recv(4) == b"ping"
                    worst = max(worst, time.perf_counter() - t)
        finally:
            for s in socks:
                s.close()
    assert growth <= 48 << 20, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert worst < 0.05, f"a fresh client waited {worst * 1000:.1f} ms"
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_stalled_connections_resume_and_echo_everything(tmp_path) -> None:
    """
    Over the bound, connections that hold output stop reading; once their
    clients read, they drain and resume, and every byte comes back, in order.
    """
    path = tmp_path / "e.sock"
    with twistd(None, "--port", "tcp:0:interface=127.0.0.1", "--port", f"unix:{path}",
                "--max-buffered", "1M", cwd=tmp_path) as server:
        server.waitFor(rf"listening on {path}")
        socks = []
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            s.connect(str(path))
            s.setblocking(False)
            socks.append(s)
        sent = [hashlib.sha256() for _ in socks]
        total = 0
        block = os.urandom(1 << 16)
        for _ in range(40):  # up to 2.5 MiB each, against a 1 MiB bound
            for i, s in enumerate(socks):
                try:
                    n = s.send(block)
                except BlockingIOError:
                    time.sleep(0.001)
                    continue
                sent[i].update(block[:n])
                total += n
        assert total > 4 << 20  # past what the kernel holds (208 KiB each): some stalled
        for i, s in enumerate(socks):
            s.setblocking(True)
            s.settimeout(20)
            s.shutdown(socket.SHUT_WR)
            got = hashlib.sha256()
            while data := s.recv(1 << 16):
                got.update(data)
            assert got.digest() == sent[i].digest()
            s.close()
    assert "Traceback" not in server.output()


bound: BufferBound
