"""
Tests of L{echoplug.proxied}: the PROXY protocol in echoplug's protocol, as
units against L{StringTransport} and a fake clock (modes, the peer it names,
the per-peer cap, the deadline, the rate-limited log), then through a real
C{twistd echoplug --proxy-protocol} on loopback sockets (16 MiB and a
half-close, byte-exact; the access log; the metrics).
"""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from echoplug.factory import EchoFactory
from echoplug.protocol import Echo, TracingEcho
from echoplug.proxied import ProxyEcho, TracingProxyEcho
from tests.support import connect, halfCloseOn, recvAll, served, twistd
from tests.test_factory import Events
from tests.test_proxyheader import v1, v2

BALANCER = IPv4Address("TCP", "127.0.0.1", 5678)


def factoryFor(mode: str = "required", **kw: object) -> EchoFactory:
    kw.setdefault("clock", Clock())
    return EchoFactory(proxyProtocol=mode, **kw)  # type: ignore[arg-type]


def connected(factory: EchoFactory, balancer: IPv4Address = BALANCER
              ) -> tuple[ProxyEcho, StringTransport]:
    proto = factory.buildProtocol(balancer)
    assert isinstance(proto, ProxyEcho)
    transport = StringTransport(peerAddress=balancer)
    proto.makeConnection(transport)
    return proto, transport


def aborted(transport: StringTransport) -> bool:
    # StringTransport.abortConnection sets "disconnected" (its docstring says "aborted").
    return bool(getattr(transport, "disconnected", False))


def closeLines(events: list[dict]) -> list[str]:
    return [e["log_echoplug_text"] for e in events if "log_echoplug_text" in e
            and e["log_echoplug_text"].startswith("close")]


def test_protocol_chosen_by_mode() -> None:
    assert EchoFactory(proxyProtocol="off").protocol is Echo
    assert factoryFor("required").protocol is ProxyEcho
    assert factoryFor("optional", trace=True).protocol is TracingProxyEcho
    with pytest.raises(ValueError):
        EchoFactory(proxyProtocol="sometimes")


def test_header_names_the_peer_and_is_never_echoed() -> None:
    factory = factoryFor()
    with Events() as events:
        proto, transport = connected(factory)
        assert factory.connections == {proto} and factory.accepted == 0
        header = v2("192.0.2.1", "198.51.100.2", 4242, 10000)
        for i in range(len(header)):
            proto.dataReceived(header[i:i + 1])  # one byte at a time
        proto.dataReceived(b"hello")
        assert transport.value() == b"hello"
        assert factory.accepted == 1 and proto.bytesIn == 5
        assert proto.client == IPv4Address("TCP", "192.0.2.1", 4242)
        # The plain path, bound on the instance: no flag tested per message.
        assert proto.dataReceived.__func__ is Echo.dataReceived  # type: ignore[attr-defined]
        proto.readConnectionLost()
        assert transport.disconnecting
        proto.connectionLost(Failure(ConnectionDone()))
    assert closeLines(events) == [
        f"close 192.0.2.1:4242 via 127.0.0.1:5678 after {events[-1]['duration']:.3f}s, "
        "5 bytes received, 5 bytes sent, closed"]
    assert factory.bytesReceived == 5


def test_data_in_the_same_read_as_the_header_is_echoed() -> None:
    proto, transport = connected(factoryFor())
    proto.dataReceived(v1("192.0.2.1", "192.0.2.2", 1, 2) + b"first")
    proto.dataReceived(b" second")
    assert transport.value() == b"first second"


@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=10), st.booleans())
def test_any_split_echoes_exactly_the_data(data: bytes, cuts: list[int], optional: bool) -> None:
    proto, transport = connected(factoryFor("optional" if optional else "required"))
    stream = v2("2001:db8::1", "2001:db8::2", 1, 2, tlvs=b"\x04\x00\x02ab") + data
    points = sorted({c % (len(stream) + 1) for c in cuts})
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        proto.dataReceived(stream[a:b])
    proto.readConnectionLost()
    assert transport.value() == data
    assert not aborted(transport)


def test_local_and_unknown_keep_the_balancer_as_peer() -> None:
    for header in (v2(local=True), b"PROXY UNKNOWN\r\n"):
        proto, transport = connected(factoryFor())
        proto.dataReceived(header + b"x")
        assert (proto.client, proto.via, proto.admitted) == (None, None, True)
        assert transport.value() == b"x"


@pytest.mark.parametrize("chunks", [[b"hello"], [b"PROX", b"IMA"], [b"\r\n", b"\r\n", b"GET"]])
def test_optional_mode_serves_plain_echo_losing_nothing(chunks: list[bytes]) -> None:
    factory = factoryFor("optional")
    proto, transport = connected(factory)
    for chunk in chunks:
        proto.dataReceived(chunk)
    assert transport.value() == b"".join(chunks)
    assert proto.admitted and proto.client is None
    assert factory.clock.getDelayedCalls() == []  # the deadline is cancelled


def test_optional_mode_eof_within_a_signature_prefix_echoes_it() -> None:
    proto, transport = connected(factoryFor("optional"))
    proto.dataReceived(b"PRO")
    proto.readConnectionLost()
    assert transport.value() == b"PRO"
    assert transport.disconnecting and not aborted(transport)


@pytest.mark.parametrize("mode, data, reason", [
    ("required", b"GET / HTTP/1.0\r\n", "missing"),
    ("optional", b"PROXY TCP4 nonsense\r\n", "malformed"),
    ("required", b"PROXY " + b"x" * 200, "oversized"),
    ("required", v2("192.0.2.1", "192.0.2.2", 1, 2)[:14] + b"\xff\xff", "oversized"),
])
def test_bad_header_closes_counts_and_echoes_nothing(mode: str, data: bytes, reason: str) -> None:
    factory = factoryFor(mode)
    proto, transport = connected(factory)
    proto.dataReceived(data)
    assert aborted(transport) and transport.value() == b""
    assert factory.headerFailures[reason] == 1
    proto.connectionLost(Failure(ConnectionLost()))
    assert factory.connections == set() and factory.accepted == 0
    assert factory.headerFailures[reason] == 1  # not counted twice


def test_deadline() -> None:
    clock = Clock()
    factory = factoryFor(clock=clock, proxyTimeout=5.0)
    proto, transport = connected(factory)
    proto.dataReceived(b"PROXY TCP4 192.0.2.1")  # a trickle that never ends
    clock.advance(4.9)
    assert not aborted(transport)
    clock.advance(0.1)
    assert aborted(transport) and factory.headerFailures["timeout"] == 1
    # A header in time cancels it.
    proto, transport = connected(factory)
    proto.dataReceived(v1("192.0.2.1", "192.0.2.2", 1, 2))
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert not aborted(transport)


def test_lost_within_the_header_is_counted_incomplete() -> None:
    factory = factoryFor()
    proto, _ = connected(factory)
    proto.dataReceived(b"PROXY TCP4")
    proto.connectionLost(Failure(ConnectionLost()))
    assert factory.headerFailures["incomplete"] == 1
    assert factory.clock.getDelayedCalls() == []
    assert factory.connections == set()


def test_per_peer_cap_applies_to_the_client_not_the_balancer() -> None:
    factory = factoryFor(maxPerPeer=1)
    a, _ = connected(factory)
    a.dataReceived(v1("192.0.2.1", "192.0.2.9", 1, 2))
    b, _ = connected(factory)  # same balancer, another client: served
    b.dataReceived(v1("192.0.2.2", "192.0.2.9", 1, 2))
    assert a.admitted and b.admitted and factory.perPeer == {"192.0.2.1": 1, "192.0.2.2": 1}
    c, transport = connected(factory)
    with Events() as events:
        c.dataReceived(v1("192.0.2.1", "192.0.2.9", 3, 2) + b"x")
    assert aborted(transport) and transport.value() == b""
    assert factory.refused == 1
    assert "at --max-connections-per-peer 1 for 192.0.2.1" in events[0]["why"]
    c.connectionLost(Failure(ConnectionLost()))
    a.connectionLost(Failure(ConnectionDone()))
    assert factory.perPeer == {"192.0.2.2": 1}


def test_bad_headers_log_at_most_a_line_a_second() -> None:
    clock = Clock()
    factory = factoryFor(clock=clock)
    with Events() as events:
        for _ in range(1000):
            proto, _ = connected(factory)
            proto.dataReceived(b"garbage")
            proto.connectionLost(Failure(ConnectionLost()))
        lines = [e for e in events if "PROXY header" in e.get("log_format", "")]
        assert len(lines) == 1
        clock.advance(1)
        lines = [e for e in events if "PROXY header" in e.get("log_format", "")]
    assert len(lines) == 2 and lines[1]["n"] == 999
    assert factory.headerFailures["missing"] == 1000


def test_trace_names_the_client() -> None:
    factory = factoryFor(trace=True)
    with Events() as events:
        proto, transport = connected(factory)
        proto.dataReceived(v1("192.0.2.1", "192.0.2.2", 7, 8) + b"x")
    texts = [e["log_format"].format(**e) for e in events if "log_format" in e]
    assert "PROXY header from 127.0.0.1:5678: v1 for 192.0.2.1:7" in texts
    assert "received b'x' from 192.0.2.1:7 via 127.0.0.1:5678" in texts
    assert isinstance(proto, TracingEcho) and transport.value() == b"x"


# Through a real twistd.


@pytest.mark.slow
def test_16_mib_through_proxy_v2_then_half_close(tmp_path) -> None:
    data = bytes(range(256)) * (1 << 16)  # 16 MiB
    chunks = [data[i:i + (1 << 18)] for i in range(0, len(data), 1 << 18)]
    with twistd("epoll", "--proxy-protocol", "required", cwd=tmp_path) as server:
        with connect(server.port, timeout=60) as s:
            local = s.getsockname()
            header = v2("203.0.113.7", "198.51.100.1", 40000, 10000)
            echoed = halfCloseOn(s, [header, *chunks], timeout=60)
        assert echoed == data
        server.waitFor(rf"close 203\.0\.113\.7:40000 via 127\.0\.0\.1:{local[1]} after "
                       rf"[\d.]+s, {len(data)} bytes received, {len(data)} bytes sent, closed")


def unserved(s: socket.socket) -> bool:
    """The server closes C{s} (a reset: it aborts) having echoed nothing."""
    s.settimeout(5)
    try:
        return recvAll(s) == b""
    except ConnectionResetError:
        return True


@pytest.mark.slow
def test_modes_and_metrics_through_twistd(tmp_path) -> None:
    with twistd("epoll", "--proxy-protocol", "optional", "--proxy-timeout", "0.5",
                "--metrics", "tcp:0:interface=127.0.0.1", cwd=tmp_path) as server:
        with connect(server.port) as s:
            assert served(s)  # plain echo: a health check without a header
        with connect(server.port) as s:
            s.sendall(b"PROXY TCP4 bad\r\n")
            assert unserved(s)
        with connect(server.port) as s:
            s.sendall(b"PROXY TCP4 1.2.3.4")  # never finished
            assert unserved(s)
        server.waitFor(r"bad PROXY header from 127\.0\.0\.1:\d+: PROXY v1 header")
        m = server.waitFor(r"serving metrics on 127\.0\.0\.1:(\d+)")
        with socket.create_connection(("127.0.0.1", int(m[1])), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            page = recvAll(s).decode()
        for reason, n in (("malformed", 1), ("timeout", 1), ("missing", 0)):
            assert re.search(rf'echoplug_proxy_header_failures_total{{reason="{reason}"}} '
                             rf"{n}\.0", page), page


@pytest.mark.parametrize(("args", "words"), [
    (["--proxy-protocol", "sometimes"], "choose one of off, optional, required"),
    (["--proxy-timeout", "-1"], "0 or more"),
    (["--proxy-protocol", "required", "--port", "ssl:0:privateKey=k.pem"],
     "does not work with TLS listeners"),
])
def test_bad_proxy_options_exit_with_one_line(args: list[str], words: str) -> None:
    from tests.test_tap import parse

    with pytest.raises(SystemExit) as e:
        parse(*args)
    assert words in str(e.value.code) and "\n" not in str(e.value.code)


def test_proxy_options_reach_the_factory() -> None:
    from echoplug.tap import makeService
    from tests.test_tap import parse

    factory = makeService(parse("--proxy-protocol", "optional", "--proxy-timeout", "2")).factory
    assert (factory.proxyProtocol, factory.proxyTimeout, factory.protocol) == (
        "optional", 2.0, ProxyEcho)
    defaults = parse()
    assert (defaults["proxy-protocol"], defaults["proxy-timeout"]) == ("off", 5.0)
