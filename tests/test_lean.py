"""
echoplug's lean TCP listener (L{echoplug._twisted.LeanPort} and
L{echoplug._twisted.LeanServer}): every echo listener gets it, it behaves
as Twisted's C{tcp.Port} and C{tcp.Server} do, and it hands an accept
error to Twisted's own loop. The source of what it copies is pinned in
tests/test__twisted.py.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    serverFromString,
)
from twisted.internet.error import ConnectionAborted, ConnectionDone

from echoplug import _twisted
from echoplug.eager import PLAIN
from echoplug.factory import EchoFactory, Keepalive
from echoplug.service import EchoService, Listener


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


@defer.inlineCallbacks
def echoOnce(port: int, payload: bytes, host: str = "127.0.0.1") -> Any:
    """Send C{payload}, half-close, and return all that comes back (IPv4 or IPv6)."""
    proto = Collect()
    endpoint = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    ep = endpoint(reactor, host, port)
    p = yield ep.connect(protocol.Factory.forProtocol(lambda: proto))
    p.transport.write(payload)
    p.transport.loseWriteConnection()
    return (yield proto.done)


@pytest.fixture
def listening() -> Any:
    """An EchoService with one loopback listener; yields (service, factory)."""
    started: list[EchoService] = []

    @defer.inlineCallbacks
    def start(description: str = "tcp:0:interface=127.0.0.1", label: str | None = None,
              **kw: Any) -> Any:
        factory = EchoFactory(logLevel="warn", **kw)
        service = EchoService(factory)
        service.listen(label or description, serverFromString(reactor, description))
        service.privilegedStartService()
        service.startService()
        started.append(service)
        (port,) = yield service.whenListening()
        return port, factory

    yield start
    for service in started:
        pytest_twisted.blockon(defer.maybeDeferred(service.stopService))


@pytest_twisted.inlineCallbacks
def test_echo_listeners_are_lean(listening) -> None:
    port, factory = yield listening()
    assert type(port) is _twisted.LeanPort
    seen: list[Any] = []
    made = factory.connectionMade

    def spy(proto: Any) -> None:
        seen.append(proto.transport)
        made(proto)

    factory.connectionMade = spy
    payload = bytes(range(256)) * 64
    assert (yield echoOnce(port.getHost().port, payload)) == payload
    (transport,) = seen
    assert type(transport) is _twisted.LeanServer and type(transport) in PLAIN
    assert factory.accepted == 1 and factory.bytesReceived == len(payload)


@pytest_twisted.inlineCallbacks
def test_lean_transport_names_itself_as_twisted_does(listening) -> None:
    """getPeer, getHost, logPrefix and repr: what tcp.Server gives."""
    port, factory = yield listening()
    names: list[tuple[Any, ...]] = []
    made = factory.connectionMade

    def spy(proto: Any) -> None:
        t = proto.transport
        peer = t.getPeer()
        stock = tcp.Server.getPeer(t)
        names.append((peer, stock, t.getHost(), t.logPrefix(), t.logstr, repr(t),
                      t.getPeer() is peer))
        made(proto)

    factory.connectionMade = spy
    yield echoOnce(port.getHost().port, b"x")
    ((peer, stock, host, prefix, logstr, rep, same),) = names
    assert isinstance(peer, IPv4Address) and peer == stock and same
    assert host == port.getHost()
    assert prefix == logstr == "Echo,0,127.0.0.1"
    assert rep == f"<Echo #0 on {port.getHost().port}>"


@pytest_twisted.inlineCallbacks
def test_lean_listener_over_ipv6(listening) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    port, factory = yield listening(r"tcp6:0:interface=\:\:1")
    assert type(port) is _twisted.LeanPort
    peers: list[Any] = []
    made = factory.connectionMade
    factory.connectionMade = lambda p: (peers.append(p.transport.getPeer()), made(p))
    assert (yield echoOnce(port.getHost().port, b"six", "::1")) == b"six"
    assert isinstance(peers[0], IPv6Address) and peers[0].host == "::1"


def test_only_a_plain_tcp_port_is_made_lean() -> None:
    class Sub(tcp.Port):
        pass

    assert _twisted.leanTCPAccept(tcp.Port(0, None)) is True
    for other in (Sub(0, None), object()):
        assert _twisted.leanTCPAccept(other) is False
        assert type(other) is not _twisted.LeanPort
    custom = tcp.Port(0, None)
    custom.transport = type("T", (tcp.Server,), {})  # type: ignore[assignment]
    assert _twisted.leanTCPAccept(custom) is False


def test_metrics_listener_keeps_twisted_port() -> None:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    listener = Listener("tcp:0", serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
                        Site(Resource()))
    listener.privilegedStartService()
    try:
        assert type(listener.port) is tcp.Port
    finally:
        assert listener.port is not None
        listener.port.stopListening()


class FailingAccept:
    """A listening socket whose next C{_accept} fails with C{errors}, in turn."""

    def __init__(self, sock: socket.socket, errors: list[int]) -> None:
        self._socket = sock
        self.errors = errors
        self.stockAccepts = 0

    def _accept(self) -> Any:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, errno.errorcode[code])
        return self._socket._accept()  # type: ignore[attr-defined]

    def accept(self) -> Any:
        # What Twisted's own loop (tcp._accept) calls.
        self.stockAccepts += 1
        return self._socket.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("code", [errno.EPERM, errno.ECONNABORTED, errno.EMFILE])
def test_accept_errors_go_to_twisteds_loop(listening, code: int) -> None:
    """
    Any accept error but EAGAIN goes to Twisted's doRead, which knows each
    one (EMFILE: its reserved descriptor; ECONNABORTED: a line) and gets
    that very error; the client queued behind is served.
    """
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    port, factory = yield listening()
    wrapped = FailingAccept(port.socket, [code])
    port.socket = wrapped
    try:
        first = yield echoOnce(port.getHost().port, b"after an error")
        later = yield echoOnce(port.getHost().port, b"later")
    finally:
        port.socket = wrapped._socket
        globalLogPublisher.removeObserver(events.append)
    assert not wrapped.errors and port.socket is wrapped._socket
    if code == errno.EMFILE:
        # Twisted's recovery: the clients queued then are closed unserved.
        assert first == b"" and factory.accepted == 1
    else:
        assert first == b"after an error" and factory.accepted == 2
    assert later == b"later"
    if code == errno.EPERM:
        # Twisted's loop skips it and accepts the next one itself.
        assert wrapped.stockAccepts >= 1
    said = [e.get("acceptError") for e in events
            if e.get("log_format") == "Could not accept new connection ({acceptError})"]
    assert said == (["ECONNABORTED"] if code == errno.ECONNABORTED else [])
    emfile = [e for e in events if "EMFILE" in str(e.get("log_format", ""))]
    assert bool(emfile) == (code == errno.EMFILE)


@pytest_twisted.inlineCallbacks
def test_refused_connection_is_closed_unserved(listening) -> None:
    port, factory = yield listening(maxConnections=0)
    assert (yield echoOnce(port.getHost().port, b"no")) == b""
    assert factory.refused == 1 and factory.accepted == 0


@pytest_twisted.inlineCallbacks
def test_clean_close_and_abort_tell_their_reasons(listening) -> None:
    port, factory = yield listening()
    reasons: list[Any] = []
    lost = factory.connectionLost
    factory.connectionLost = lambda p, r: (reasons.append(r.value), lost(p, r))
    made = factory.connectionMade
    factory.connectionMade = lambda p: (made(p), p.transport.abortConnection())
    assert (yield echoOnce(port.getHost().port, b"cut")) == b""
    factory.connectionMade = made
    assert (yield echoOnce(port.getHost().port, b"whole")) == b"whole"
    assert isinstance(reasons[0], ConnectionAborted)
    assert isinstance(reasons[1], ConnectionDone)


@pytest_twisted.inlineCallbacks
def test_keepalive_is_set_once_on_the_listener_and_inherited(listening) -> None:
    """
    Linux copies the listener's keepalive options to each accepted socket,
    so echoplug sets them on the listener only; if a kernel stopped copying
    them, this fails.
    """
    keep = Keepalive.after(300)
    port, factory = yield listening(keepalive=keep)
    assert port.keepaliveSet
    got: list[tuple[int, ...]] = []
    made = factory.connectionMade

    def spy(proto: Any) -> None:
        s = proto.transport.getHandle()
        T = socket.IPPROTO_TCP
        got.append((s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
                    s.getsockopt(T, socket.TCP_KEEPIDLE), s.getsockopt(T, socket.TCP_KEEPINTVL),
                    s.getsockopt(T, socket.TCP_KEEPCNT), s.getsockopt(T, socket.TCP_USER_TIMEOUT)))
        made(proto)

    factory.connectionMade = spy
    yield echoOnce(port.getHost().port, b"k")
    assert got == [(True, keep.idle, keep.interval, keep.count, keep.userTimeout)]


@pytest_twisted.inlineCallbacks
def test_abort_resets_and_clean_close_does_not(listening) -> None:
    """The client sees a reset for an abort (SO_LINGER 0), a FIN for a close."""
    port, factory = yield listening()
    made = factory.connectionMade
    factory.connectionMade = lambda p: (made(p), p.transport.abortConnection())

    def exchange(payload: bytes) -> tuple[bytes, str]:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) as c:
            got = b""
            try:
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
                while chunk := c.recv(65536):
                    got += chunk
            except OSError as e:
                # The reset may come before the shutdown (ENOTCONN) or the read.
                if e.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                    return got, "reset"
                raise
            return got, "fin"

    from twisted.internet import threads

    assert (yield threads.deferToThread(exchange, b"cut")) == (b"", "reset")
    factory.connectionMade = made
    assert (yield threads.deferToThread(exchange, b"whole")) == (b"whole", "fin")


@pytest_twisted.inlineCallbacks
def test_closed_transports_leave_the_reactor_and_keep_their_names(listening) -> None:
    port, factory = yield listening()
    seen: list[Any] = []
    made = factory.connectionMade
    factory.connectionMade = lambda p: (seen.append(p.transport), made(p))
    for _ in range(2):
        yield echoOnce(port.getHost().port, b"x")
    first, second = seen
    assert (first.sessionno, second.sessionno) == (0, 1)
    for t in seen:
        assert t not in reactor.getReaders() and t not in reactor.getWriters()
        assert t.disconnected and not t.connected
    number = port.getHost().port
    assert second.logPrefix() == "Echo,1,127.0.0.1"  # first asked after the close
    assert repr(second) == f"<Echo #1 on {number}>"


@pytest_twisted.inlineCallbacks
def test_a_systemd_socket_keeps_its_settings_and_connections_get_keepalive(listening) -> None:
    """
    A socket systemd passed outlives echoplug: the options go on each
    connection, not on the listener.
    """
    keep = Keepalive.after(300)
    port, factory = yield listening(label="systemd:name=echo", keepalive=keep)
    assert type(port) is _twisted.LeanPort and not port.keepaliveSet
    assert port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    got: list[int] = []
    made = factory.connectionMade

    def spy(proto: Any) -> None:
        made(proto)
        got.append(proto.transport.getHandle().getsockopt(socket.IPPROTO_TCP,
                                                          socket.TCP_KEEPIDLE))

    factory.connectionMade = spy
    yield echoOnce(port.getHost().port, b"k")
    assert got == [keep.idle]


class ScopedAccept(FailingAccept):
    """Accepts as the socket does, but names the peer fe80::1 on interface 1."""

    def _accept(self) -> Any:
        fd, addr = self._socket._accept()  # type: ignore[attr-defined]
        return fd, ("fe80::1", addr[1], 0, 1)


@pytest_twisted.inlineCallbacks
def test_ipv6_peer_keeps_its_scope(listening) -> None:
    """As Twisted does: an IPv6 peer's scope ID is in its host (getnameinfo)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        expected = socket.getnameinfo(("fe80::1", 1, 0, 1),
                                      socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
    except OSError:
        pytest.skip("no IPv6 here")
    port, factory = yield listening(r"tcp6:0:interface=\:\:1")
    peers: list[Any] = []
    made = factory.connectionMade
    factory.connectionMade = lambda p: (peers.append(p.transport.getPeer()), made(p))
    wrapped = ScopedAccept(port.socket, [])
    port.socket = wrapped
    try:
        assert (yield echoOnce(port.getHost().port, b"scoped", "::1")) == b"scoped"
    finally:
        port.socket = wrapped._socket
    assert isinstance(peers[0], IPv6Address) and peers[0].host == expected
    assert "%" in expected
