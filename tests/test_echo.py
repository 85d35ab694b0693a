"""
Echo behaviour over real loopback sockets against real C{twistd} processes,
on every reactor: byte-exactness, many connections, backpressure and
half-close. The stock C{wire.Echo} runs beside echoplug where that shows
the test can fail.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import selectors
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import (
    REACTORS,
    connect,
    echoHalfClose,
    pushWithoutReading,
    recvAll,
    rssBytes,
    stockEcho,
    twistd,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One real twistd per reactor, started together, for the whole module."""
    with contextlib.ExitStack() as stack:
        running = {}
        for reactor in REACTORS:
            s = stack.enter_context(twistd(reactor, cwd=tmp_path_factory.mktemp(reactor)))
            assert s.reactor == reactor
            running[reactor] = s
        yield running


@pytest.fixture(params=REACTORS)
def server(request, servers):
    return servers[request.param]


@pytest.fixture(scope="module")
def epollServer(tmp_path_factory):
    with twistd("epoll", "--log-level", "warn", cwd=tmp_path_factory.mktemp("srv")) as s:
        yield s


@pytest.mark.slow
def test_startup_line_names_reactor(server) -> None:
    assert f"reactor={server.reactor} (" in server.output()
    assert f"listening on 127.0.0.1:{server.port}" in server.output()


@pytest.mark.slow
def test_many_connections_at_once(server) -> None:
    """50 connections, interleaved random binary writes, each echo checked."""
    rng = random.Random(862)
    sel = selectors.DefaultSelector()
    expected: dict[socket.socket, bytes] = {}
    got: dict[socket.socket, bytearray] = {}
    for _ in range(50):
        s = connect(server.port)
        s.setblocking(False)
        expected[s] = rng.randbytes(rng.randrange(1, 200_000))
        got[s] = bytearray()
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    sent = dict.fromkeys(expected, 0)
    for _ in range(100_000):  # bounded
        if all(len(got[s]) == len(expected[s]) for s in expected):
            break
        for key, events in sel.select(timeout=5):
            s = key.fileobj
            if events & selectors.EVENT_WRITE and sent[s] < len(expected[s]):
                n = s.send(expected[s][sent[s]: sent[s] + rng.randrange(1, 65536)])
                sent[s] += n
                if sent[s] == len(expected[s]):
                    sel.modify(s, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                got[s] += s.recv(1 << 16)
    for s in expected:
        assert bytes(got[s]) == expected[s]
        s.close()
    sel.close()


@pytest.mark.slow
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(min_size=1, max_size=4096), min_size=1, max_size=30))
def test_property_byte_exact_any_chunking(epollServer, chunks: list[bytes]) -> None:
    assert echoHalfClose(epollServer.port, chunks) == b"".join(chunks)


# Not parametrized: pytest-twisted 1.14 wraps a hypothesis test in place, so a
# parametrized one is wrapped twice and fails. Each example goes to every reactor.
@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(data=st.binary(min_size=1, max_size=300_000), cuts=st.lists(st.integers(0, 300_000)))
def test_property_every_reactor_every_byte(servers, data: bytes, cuts: list[int]) -> None:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    for reactor, server in servers.items():
        assert echoHalfClose(server.port, chunks) == data, reactor


@pytest.mark.slow
def test_half_close_returns_everything(server) -> None:
    """16 MiB, then SHUT_WR: all 16 MiB come back byte-exact, then EOF."""
    payload = os.urandom(16 * MiB)
    chunks = [payload[i: i + MiB] for i in range(0, len(payload), MiB)]
    assert echoHalfClose(server.port, chunks, timeout=60) == payload


@pytest.mark.slow
def test_backpressure_bounds_memory(server) -> None:
    """A client that writes and never reads: the server grows by at most 8 MiB."""
    before = rssBytes(server.pid)
    pushed, after = pushWithoutReading(server.port, 200 * MiB, lambda: rssBytes(server.pid))
    assert after - before <= 8 * MiB, (pushed, after - before)
    # It stopped reading: the kernel buffers, not 200 MiB, were all it took.
    assert pushed < 64 * MiB


@pytest.mark.slow
@pytest.mark.parametrize("reactor", ["epoll"])
def test_stock_echo_fails_what_echoplug_passes(tmp_path, reactor: str) -> None:
    """
    The same two checks against stock wire.Echo: it grows with what the
    client pushes and loses the tail after a half-close. If these ever pass
    on stock Twisted, the checks above no longer prove anything.
    """
    with stockEcho(reactor, tmp_path) as stock:
        before = rssBytes(stock.pid)
        pushed, after = pushWithoutReading(stock.port, 64 * MiB, lambda: rssBytes(stock.pid))
        assert pushed == 64 * MiB
        assert after - before > 32 * MiB
        # Send everything, half-close, and only then read: stock Echo has
        # buffered it all, and drops what it had not sent when EOF arrives.
        payload = os.urandom(16 * MiB)
        with connect(stock.port, timeout=30) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            back = recvAll(s)
        assert len(back) < len(payload)
