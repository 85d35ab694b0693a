"""
Tests of L{echoplug.factory}: the caps, the rate-limited refusal log and the
idle sweep, as units against L{StringTransport} and a fake clock, then
through a real C{twistd echoplug} on loopback sockets.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from echoplug.factory import EchoFactory, Keepalive, describeReason, prefixKey
from echoplug.protocol import Echo
from tests.support import REACTORS, connect, rssBytes, served, twistd


def peer(host: str = "127.0.0.1", port: int = 5678) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def open_(factory: EchoFactory, host: str = "127.0.0.1") -> Echo | None:
    proto = factory.buildProtocol(peer(host))
    if proto is None:
        return None
    proto.makeConnection(StringTransport(peerAddress=peer(host)))
    return proto


def lose(proto: Echo) -> None:
    proto.connectionLost(Failure(ConnectionDone()))


class Events:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __enter__(self) -> list[dict]:
        globalLogPublisher.addObserver(self.events.append)
        return self.events

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)


def refusals(events: list[dict]) -> list[str]:
    """The refusal lines, the counted ones as "N more"."""
    return [f"{e['n']} more" if "n" in e else e["why"]
            for e in events if e.get("log_format", "").startswith("refused")]


def test_total_cap_refuses_and_counts() -> None:
    factory = EchoFactory(maxConnections=2, clock=Clock())
    first, second = open_(factory), open_(factory)
    assert first is not None and second is not None
    assert open_(factory) is None
    assert (factory.accepted, factory.refused, len(factory.connections)) == (2, 1, 2)
    lose(first)
    assert open_(factory) is not None  # room again once one closed


def test_per_peer_cap_counts_by_host() -> None:
    factory = EchoFactory(maxPerPeer=2, clock=Clock())
    a = [open_(factory, "10.0.0.1") for _ in range(3)]
    assert a[2] is None
    assert open_(factory, "10.0.0.2") is not None
    assert factory.perPeer == {"10.0.0.1": 2, "10.0.0.2": 1}
    lose(a[0])
    lose(a[1])
    assert factory.perPeer == {"10.0.0.2": 1}  # no empty entries left behind
    assert open_(factory, "10.0.0.1") is not None


def test_per_peer_cap_ignores_unix_peers() -> None:
    factory = EchoFactory(maxPerPeer=1, clock=Clock())
    for _ in range(3):
        assert factory.buildProtocol(UNIXAddress(None)) is not None
    assert factory.perPeer == {}


def test_refusal_log_is_rate_limited() -> None:
    clock = Clock()
    factory = EchoFactory(maxConnections=1, clock=clock)
    open_(factory)
    with Events() as events:
        for _ in range(1000):
            assert open_(factory) is None
        assert len(refusals(events)) == 1  # the first one, at once
        clock.advance(1.0)  # the rest, counted, in one line
        assert refusals(events)[-1] == "999 more"
        clock.advance(10)
        open_(factory)
    assert refusals(events) == ["at --max-connections 1", "999 more", "at --max-connections 1"]
    assert factory.refused == 1001


def test_idle_sweep_closes_only_idle_connections() -> None:
    clock = Clock()
    factory = EchoFactory(idleTimeout=10, clock=clock)
    factory.setSweeps(5)  # a sweep every 2 s
    idle, busy = open_(factory), open_(factory)
    assert idle is not None and busy is not None
    for _ in range(8):  # 16 s: busy receives something every 2 s
        busy.dataReceived(b"x")
        factory.sweepIdle()
        clock.advance(2)
    factory.sweepIdle()
    assert idle.closeReason == "idle timeout"
    assert idle.transport.disconnecting  # an orderly close: nothing was left to send
    assert busy.closeReason is None


def test_idle_sweep_aborts_a_connection_stuck_with_unsent_bytes() -> None:
    clock = Clock()
    factory = EchoFactory(idleTimeout=1, clock=clock)
    factory.setSweeps(2)
    proto = open_(factory)
    assert proto is not None
    transport = proto.transport
    transport._tempDataLen = 5  # as a paused TCP transport would hold it
    transport.dataBuffer, transport.offset = b"", 0
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    for _ in range(4):
        factory.sweepIdle()
        clock.advance(0.5)
    assert aborted and proto.closeReason == "idle timeout"


def test_descriptor_at_the_select_wall_is_refused() -> None:
    factory = EchoFactory(clock=Clock())
    factory.fdWall = 1024
    for fd, kept in ((1023, True), (1024, False)):
        proto = factory.buildProtocol(peer())
        assert proto is not None
        transport = StringTransport(peerAddress=peer())
        transport.fileno = lambda fd=fd: fd
        aborted = []
        transport.abortConnection = lambda aborted=aborted: aborted.append(True)
        proto.makeConnection(transport)
        assert (proto in factory.connections) is kept
        assert bool(aborted) is not kept
        lose(proto)
    assert (factory.accepted, factory.refused) == (1, 1)


def test_when_empty() -> None:
    clock = Clock()
    factory = EchoFactory(clock=clock)
    assert factory.whenEmpty().called
    proto = open_(factory)
    assert proto is not None
    d = factory.whenEmpty()
    assert not d.called
    lose(proto)
    clock.advance(0)
    assert d.called


# Through twistd, on real sockets.



def clientFrom(host: str, port: int) -> socket.socket:
    s = socket.socket()
    s.settimeout(10)
    s.bind((host, 0))
    s.connect(("127.0.0.1", port))
    return s


@pytest.mark.slow
def test_caps_through_twistd(tmp_path) -> None:
    with twistd(None, "--max-connections", "3", "--max-connections-per-peer", "2",
                "--drain-timeout", "0", cwd=tmp_path) as server:
        a1, a2 = connect(server.port), connect(server.port)
        assert served(a1) and served(a2)
        assert not served(connect(server.port))  # third from 127.0.0.1
        b1 = clientFrom("127.0.0.2", server.port)
        assert served(b1)
        assert not served(clientFrom("127.0.0.3", server.port))  # fourth in all
        assert served(a1) and served(a2) and served(b1)  # the others never noticed
        a1.close()
        server.waitFor(r"close 127\.0\.0\.1:\d+ after")
        assert served(connect(server.port))
        server.waitFor(r"refused 127\.0\.0\.1:\d+: at --max-connections-per-peer 2")
        # Within a second of the first refusal: counted in a later line.
        server.waitFor(r"refused (127\.0\.0\.3:\d+: at --max-connections 3|1 more)")
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_refusal_flood_logs_few_lines(tmp_path) -> None:
    with twistd(None, "--max-connections", "1", "--drain-timeout", "0",
                cwd=tmp_path) as server:
        keep = connect(server.port)
        assert served(keep)
        for _ in range(300):
            with connect(server.port) as s:
                assert not served(s)
        assert served(keep)
        server.waitFor(r"more")
    lines = [line for line in server.lines if "refused" in line]
    assert 1 <= len(lines) < 30, lines
    assert "300" in "".join(server.lines) or "299" in "".join(server.lines)


@pytest.mark.slow
@pytest.mark.parametrize("reactor", REACTORS)
def test_idle_timeout_closes_idle_and_paused(tmp_path, reactor: str) -> None:
    with twistd(reactor, "--idle-timeout", "0.5", "--drain-timeout", "0",
                cwd=tmp_path) as server:
        idle = connect(server.port)
        assert served(idle)
        # A client that writes and never reads: the server pauses it.
        paused = connect(server.port)
        paused.setblocking(False)
        block = b"x" * 65536
        pushed, stalled = 0, time.monotonic()
        while time.monotonic() - stalled < 0.3:
            try:
                pushed += paused.send(block)
                stalled = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        assert pushed > 1 << 20
        busy = connect(server.port)
        for _ in range(8):  # 1.6 s of traffic every 0.2 s: never idle
            assert served(busy)
            time.sleep(0.2)
        idle.settimeout(10)
        assert idle.recv(10) == b""  # closed after 0.5 s idle
        server.waitFor(r"close .* after [\d.]+s, \d+ bytes received, \d+ bytes sent, idle timeout")
        n = sum(1 for line in server.lines if "idle timeout" in line)
        deadline = time.monotonic() + 10
        while n < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            n = sum(1 for line in server.lines if "idle timeout" in line)
        assert n == 2, server.output()  # the paused one too, not the busy one
        assert served(busy)
        assert rssBytes(server.pid) > 0
    assert "Traceback" not in server.output()


def test_describe_reason() -> None:
    assert describeReason(Failure(ConnectionDone())) == "closed"
    assert describeReason(Failure(ConnectionLost())) == "lost"
    assert describeReason(Failure(ConnectionAborted())) == "lost"  # a subclass
    assert describeReason(Failure(OSError("no route"))) == "no route"


# Per-peer caps keyed on a network (--peer-prefix).


@pytest.mark.parametrize(("host", "bits", "key"), [
    ("192.0.2.7", (32, 64), "192.0.2.7"),
    ("192.0.2.7", (24, 64), "192.0.2.0/24"),
    ("10.1.2.3", (8, 64), "10.0.0.0/8"),
    ("2001:db8:1:2:3:4:5:6", (32, 64), "2001:db8:1:2::/64"),
    ("2001:db8:1:2:3:4:5:6", (32, 48), "2001:db8:1::/48"),
    ("2001:db8::1", (32, 128), "2001:db8::1"),
    ("fe80::1%eth0", (32, 64), "fe80::/64"),
    ("::ffff:192.0.2.7", (32, 64), "192.0.2.7"),  # an IPv4 client of a dual-stack port
    ("::ffff:192.0.2.7", (24, 64), "192.0.2.0/24"),
])
def test_prefix_key(host: str, bits: tuple[int, int], key: str) -> None:
    assert prefixKey(host, *bits) == key


def test_per_peer_cap_counts_a_network_as_one_peer() -> None:
    from twisted.internet.address import IPv6Address

    factory = EchoFactory(maxPerPeer=2, peerPrefix=(24, 64), clock=Clock())
    assert open_(factory, "10.0.0.1") and open_(factory, "10.0.0.2")
    assert open_(factory, "10.0.0.3") is None  # same /24
    assert open_(factory, "10.0.1.1") is not None  # another /24
    assert factory.perPeer == {"10.0.0.0/24": 2, "10.0.1.0/24": 1}
    six = EchoFactory(maxPerPeer=1, clock=Clock())
    first = six.buildProtocol(IPv6Address("TCP", "2001:db8::1", 1))
    assert first is not None
    first.makeConnection(StringTransport())
    assert six.buildProtocol(IPv6Address("TCP", "2001:db8::ffff:2", 1)) is None  # same /64
    assert six.buildProtocol(IPv6Address("TCP", "2001:db8:0:1::1", 1)) is not None
    assert six.peerKey(UNIXAddress(b"/x")) is None


@pytest.mark.slow
def test_many_source_addresses_share_one_cap(tmp_path) -> None:
    """
    40 addresses in 127/8 each got the whole per-peer cap; keyed on a /8 they
    share it. (The default /32 keeps one address per peer: caps_through_twistd.)
    """
    with twistd(None, "--max-connections-per-peer", "5", "--peer-prefix", "8,64",
                "--drain-timeout", "0", cwd=tmp_path) as server:
        results = []
        kept = []
        for i in range(40):
            s = clientFrom(f"127.0.{i}.{i + 1}", server.port)
            kept.append(s)
            results.append(served(s))
        assert sum(results) == 5
        server.waitFor(r"at --max-connections-per-peer 5 for 127\.0\.0\.0/8")
        for s in kept:
            s.close()
    assert "Traceback" not in server.output()


# TCP keepalive (--keepalive).


@pytest_twisted.inlineCallbacks
def test_keepalive_options_on_an_accepted_socket():
    from tests.test_eager import accepted

    pair = yield accepted()
    try:
        sock = pair.transport.socket
        Keepalive.after(300).apply(pair.transport)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 300
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 360_000
    finally:
        yield pair.close()


def test_keepalive_only_when_on_and_only_on_tcp(tmp_path) -> None:
    factory = EchoFactory(clock=Clock())
    proto = open_(factory)
    assert proto is not None and factory.keepalive is None
    with socket.socket(socket.AF_UNIX) as u:
        class Unix:
            socket = u
            dataBuffer = b""

        Keepalive.after(300).apply(Unix())  # nothing to set, no error
        assert u.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


TCP_REPAIR = 19  # linux/tcp.h


@pytest.mark.slow
def test_keepalive_finds_a_peer_that_vanished(tmp_path) -> None:
    """
    A peer that vanishes without a FIN or a reset: TCP_REPAIR (root only)
    and then close() drop the client socket silently. Without keepalive the
    server's side stays open for ever; with it, the first probe meets a
    reset from the client's kernel and the connection is closed.
    """
    if os.geteuid() != 0:
        pytest.skip("TCP_REPAIR needs CAP_NET_ADMIN")
    with twistd(None, "--keepalive", "1", "--drain-timeout", "0", cwd=tmp_path) as server:
        gone = connect(server.port)
        kept = connect(server.port)  # a quiet client that is still there
        assert served(gone) and served(kept)
        port = gone.getsockname()[1]
        gone.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        gone.close()  # sends nothing
        start = time.monotonic()
        server.waitFor(rf"close 127\.0\.0\.1:{port} after .*(lost|reset)", timeout=10)
        assert time.monotonic() - start < 5
        assert served(kept)  # its probes were answered: still open
    assert "Traceback" not in server.output()


# The idle sweep: a share of the connections per sweep.


def test_idle_sweep_checks_one_bucket_per_sweep(monkeypatch) -> None:
    """
    Each sweep looks at one bucket of connections (16 sweeps per timeout, 8
    buckets), not at all of them; each connection is still checked every
    half timeout, and closed once it has been idle for a timeout.
    """
    import echoplug.factory as module

    clock = Clock()
    factory = EchoFactory(idleTimeout=16, clock=clock)
    factory.setSweeps(16)
    protos = [open_(factory) for _ in range(800)]
    checked = []
    real = module.unsentBytes
    monkeypatch.setattr(module, "unsentBytes", lambda t: checked.append(t) or real(t))
    busy = protos[0]
    assert busy is not None
    for sweep in range(1, 26):
        busy.dataReceived(b"x")
        clock.advance(1)
        factory.sweepIdle()
        assert len(checked) == 100, len(checked)  # 800 / 8 buckets
        checked.clear()
        closed = sum(p.closeReason == "idle timeout" for p in protos if p is not None)
        if sweep < 17:
            assert closed == 0  # none idle for a timeout yet
    # By 1.5 timeouts (24 sweeps) every idle one is closed, the busy one never.
    assert closed == 799 and busy.closeReason is None
    lose(busy)
    assert busy not in factory.idleBuckets[busy.idleSlot]
