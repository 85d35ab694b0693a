"""
The Twisted internals echoplug reads (L{echoplug._twisted}), pinned: each
name exists with the default or meaning echoplug assumes, and the Twisted
methods the lean reactors copy are unchanged, so that a Twisted upgrade that
changes any of them fails here instead of silently losing data or speed.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import (
    endpoints,
    epollreactor,
    pollreactor,
    reactor,
    selectreactor,
    tcp,
    threads,
    unix,
)
from twisted.internet.abstract import FileDescriptor
from twisted.logger import FileLogObserver, formatEvent
from twisted.protocols.tls import TLSMemoryBIOProtocol

from echoplug import _twisted
from echoplug.eager import PLAIN
from tests.test_eager import accepted, recvExactly
from tests.test_logs import LINES, both
from tests.test_reactors import LEAN

# Socket transports: eager writes, unsent bytes, closing at once.


def test_pinned_filedescriptor_attributes() -> None:
    """Each attribute _twisted reads exists, with the default it assumes."""
    assert FileDescriptor.dataBuffer == b""
    assert FileDescriptor.offset == 0
    assert FileDescriptor(reactor)._tempDataLen == 0
    assert FileDescriptor.disconnecting == 0
    assert FileDescriptor._writeDisconnecting is False
    assert FileDescriptor.producerPaused is False
    assert FileDescriptor.producer is None
    assert FileDescriptor.connected == 0
    assert tcp.Connection._aborting is False
    assert tcp.Server.TLS is False
    assert tcp.Client.TLS is False
    assert FileDescriptor(reactor)._tempDataBuffer == []
    # unix.Server and unix.Client are tcp's write path plus file-descriptor
    # passing, which an echo never uses.
    assert issubclass(unix.Server, tcp.Server)
    assert issubclass(unix.Client, tcp.BaseClient)
    assert issubclass(tcp.Client, tcp.Connection)
    assert PLAIN == (tcp.Server, _twisted.LeanServer, tcp.Client, unix.Server, unix.Client)
    assert issubclass(_twisted.LeanServer, tcp.Server)


@pytest_twisted.inlineCallbacks
def test_pinned_twisted_write_is_deferred():
    """
    The premise: FileDescriptor.write only buffers and asks the reactor for
    writability. If Twisted ever sends at once itself, eager.py is redundant.
    """
    pair = yield accepted()
    try:
        t = pair.transport
        assert t.socket.send is not None
        t.write(b"later")
        assert t._tempDataBuffer == [b"later"]
        assert _twisted.unsentBytes(t) == 5
        assert t in reactor.getWriters()
        assert (yield threads.deferToThread(recvExactly, pair.client, 5)) == b"later"
        assert _twisted.unsentBytes(t) == 0
    finally:
        yield pair.close()


def test_pinned_tls_plaintext_buffer() -> None:
    """
    TLS keeps the plaintext it has not given OpenSSL in _appSendBuffer, a
    list of bytes set up when the connection is made, and no dataBuffer of
    its own (so unsentBytes counts plaintext, not ciphertext).
    """
    assert "self._appSendBuffer = []" in inspect.getsource(TLSMemoryBIOProtocol.makeConnection)
    assert "self._appSendBuffer.append(" in inspect.getsource(TLSMemoryBIOProtocol)
    assert not hasattr(TLSMemoryBIOProtocol, "dataBuffer")

    class Pending:
        _appSendBuffer = [b"plain", b"text"]

    assert _twisted.unsentBytes(Pending()) == 9


# twistd's log observer.


def test_pinned_twistd_log_observer() -> None:
    """
    twistdObserver asks twistd's own UnixAppLogger for its observer and
    takes the file from it: both names must still exist and mean that.
    """
    from twisted.scripts._twistd_unix import UnixApplicationRunner, UnixAppLogger

    assert UnixApplicationRunner.loggerFactory is UnixAppLogger
    stock = UnixAppLogger({"nodaemon": True, "logfile": ""})._getLogObserver()
    assert isinstance(stock, FileLogObserver)
    assert stock._outFile is sys.stdout
    stock = _twisted.twistdLogObserver({"nodaemon": True, "logfile": ""})
    assert isinstance(stock, FileLogObserver)
    assert _twisted.observerFile(stock) is sys.stdout


def test_pinned_twisted_formats_from_log_flattened() -> None:
    """
    The saving rests on formatEvent using log_flattened when present, with
    Twisted's key names: prove it reads the pre-rendered text, not the fields.
    """
    _, fast = both(*LINES[0])
    fast["peer"] = "someone else"
    assert formatEvent(fast).startswith("close [::1]:5 after 0.012s, 1000000000000 bytes")


# The lean reactors.

# sha256 (first 16 hex digits) of the source of each Twisted method the lean
# reactors replace, as of Twisted 26.10.0. If one changes, re-read it, carry
# the change into echoplug/_twisted.py, and update the digest here.
PINNED = {
    "EPollReactor.doPoll": "09b62ae68ef01b4b",
    "PollReactor.doPoll": "55eb90313d87326e",
    "SelectReactor.doSelect": "b87499d26f45e710",
}
COPIES = {
    "EPollReactor.doPoll": _twisted.epollDoPoll,
    "PollReactor.doPoll": _twisted.pollDoPoll,
    "SelectReactor.doSelect": _twisted.selectDoSelect,
}


@pytest.mark.parametrize("name", LEAN)
def test_replaced_twisted_method_is_unchanged(name: str) -> None:
    lean, stock, method = LEAN[name]
    source = inspect.getsource(getattr(stock, method))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == PINNED[f"{stock.__name__}.{method}"], (
        f"Twisted's {stock.__name__}.{method} changed: review echoplug._twisted")
    # What the lean copy leaves out, and only that, is the log context.
    assert "callWithLogger" in source or "_logrun" in source
    # The class runs the copy in _twisted, and nothing else.
    assert lean.__dict__[method] is COPIES[f"{stock.__name__}.{method}"]


@pytest.fixture(params=list(LEAN))
def lean(request) -> Iterator[Any]:
    cls = LEAN[request.param][0]
    reactor = cls()  # not installed: only looked at
    yield reactor
    if reactor.waker is not None:
        reactor._removeInternalReader(reactor.waker)
        reactor.waker.connectionLost(None)
    poller = getattr(reactor, "_poller", None)
    if hasattr(poller, "close"):
        poller.close()


def test_pinned_reactor_internals(lean) -> None:
    """The private names the lean reactors use exist on Twisted's reactors."""
    method = "doSelect" if isinstance(lean, selectreactor.SelectReactor) else "doPoll"
    # doIteration is bound in the class body of Twisted's reactors: the
    # subclass must rebind it, or the stock method keeps running.
    assert type(lean).doIteration is getattr(type(lean), method)
    assert type(lean).__dict__[method] is not getattr(type(lean).__mro__[1], method)
    assert callable(lean._doReadOrWrite)
    if isinstance(lean, selectreactor.SelectReactor):
        assert isinstance(lean._reads, set) and isinstance(lean._writes, set)
        assert callable(selectreactor._select) and callable(lean._preenDescriptors)
    else:
        assert isinstance(lean._selectables, dict)
        assert hasattr(lean._poller, "poll")
    assert isinstance(lean, (epollreactor.EPollReactor, pollreactor.PollReactor,
                             selectreactor.SelectReactor))


# pytest-twisted.


def test_pinned_pytest_twisted_installer() -> None:
    """tests/conftest.py installs a named reactor through this private function."""
    parameters = inspect.signature(pytest_twisted._install_reactor).parameters
    assert {"reactor_installer", "reactor_type"} <= set(parameters)
    assert callable(_twisted.installTestReactor)


# --workers: shared listening sockets.


def test_ssl_endpoint_keeps_its_context_factory() -> None:
    assert "self._sslContextFactory = sslContextFactory" in inspect.getsource(
        endpoints.SSL4ServerEndpoint.__init__)


def test_ports_adopt_from_a_descriptor() -> None:
    assert inspect.signature(unix.Port._fromListeningDescriptor).parameters.keys() >= {
        "reactor", "fd", "factory"}


def test_shutdown_on_close_is_a_flag() -> None:
    source = inspect.getsource(tcp._SocketCloser._closeSocket)
    assert "if self._shouldShutdown:" in source and "skt.shutdown(2)" in source
    assert tcp.Port._shouldShutdown is True


def test_unix_port_unlinks_and_chmods_its_path() -> None:
    # What SharedUNIXPort undoes: the unlink on stop, the chmod on start.
    assert "os.unlink(self._bindPath)" in inspect.getsource(unix.Port.connectionLost)
    start = inspect.getsource(unix.Port.startListening)
    assert "os.chmod(self._bindPath, self.mode)" in start
    assert "skt.listen(self.backlog)" in start


def test_epoll_reactor_reads_through_its_poller() -> None:
    """exclusiveWakeup re-registers in the epoll reactor's own poller, which
    tracks readers by descriptor in _reads."""
    source = inspect.getsource(epollreactor.EPollReactor._add)
    assert "self._poller.register(fd, flags)" in source
    assert "primary.add(fd)" in source
    assert "reader, self._reads, self._writes, self._selectables, EPOLLIN, EPOLLOUT" in (
        inspect.getsource(epollreactor.EPollReactor.addReader))


def test_guard_keeps_a_shared_unix_port_shared() -> None:
    """A worker's adopted UNIX port is guarded too, and stays a SharedUNIXPort."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        port = _twisted.SharedUNIXPort(b"/nonexistent/x.sock", None)
        port.socket = s
        _twisted.guardUNIXAccept(port)
        assert type(port) is _twisted.GuardedSharedUNIXPort
        assert isinstance(port, _twisted.SharedUNIXPort) and port._shouldShutdown is False
        assert type(port.socket) is _twisted._GuardedAccept


# UNIX listeners: the 4-item address test in tcp.Port.doRead.


def test_pinned_accept_loop_takes_four_items_for_ipv6() -> None:
    """
    guardUNIXAccept rests on doRead taking the peer's address from
    listener.accept() (through tcp._accept), testing len(addr) == 4, and
    handing it on only to _buildAddr and the transport class.
    """
    source = inspect.getsource(tcp.Port.doRead)
    assert "if len(addr) == 4:" in source
    assert "self.factory.buildProtocol(self._buildAddr(addr))" in source
    assert "skt, protocol, addr, self, s, self.reactor" in source
    assert source.count("addr") == 7  # no other use of the address
    assert "self.socket, _reservedFD" in source
    assert "listener.accept()" in inspect.getsource(tcp._accept)
    assert unix.Port.transport is unix.Server
    assert issubclass(unix.Port, tcp.Port) and "doRead" not in unix.Port.__dict__


def test_guarded_accept_wraps_only_four_character_names(tmp_path) -> None:
    import socket

    path = str(tmp_path / "l.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        guarded = _twisted._GuardedAccept(listener)
        assert guarded.getsockname() == path  # everything else passes through
        for name in ("\0abc", "\0abcde"):
            with socket.socket(socket.AF_UNIX) as c:
                c.bind(name)
                c.connect(path)
                skt, addr = guarded.accept()
                skt.close()
                port = _twisted.GuardedUNIXPort(path.encode(), None)
                assert port._buildAddr(addr).name == name.encode()
                if len(name) == 4:
                    assert len(addr) == 1


def test_guard_leaves_other_ports_alone() -> None:
    port = unix.Port(b"/nonexistent/x.sock", None)
    _twisted.guardUNIXAccept(port)  # not listening: no socket to wrap
    assert type(port) is unix.Port

    class Other:
        socket = object()

    other = Other()
    _twisted.guardUNIXAccept(other)
    assert type(other) is Other and type(other.socket) is object


# The buffer bound: bufferSize, producerPaused, endpoint arguments.


def test_pinned_buffer_size_is_read_size_and_pause_threshold() -> None:
    """setReadSize rests on bufferSize being both, looked up on the instance."""
    assert "self.socket.recv(self.bufferSize)" in inspect.getsource(tcp.Connection.doRead)
    assert "> self.bufferSize" in inspect.getsource(FileDescriptor._isSendBufferFull)
    assert "self._maybePauseProducer()" in inspect.getsource(FileDescriptor.write)
    assert _twisted.DEFAULT_BUFFER_SIZE == FileDescriptor.bufferSize == 65536


def test_pinned_drain_resumes_a_producer_marked_paused() -> None:
    """watchDrain rests on doWrite resuming a streaming producer on this flag alone."""
    source = inspect.getsource(FileDescriptor.doWrite)
    assert "(not self.streamingProducer) or self.producerPaused" in source
    assert "self.producerPaused = False\n                self.producer.resumeProducing()" in (
        source)


def test_endpoint_arguments() -> None:
    assert _twisted.endpointArguments("unix:/x\\:y.sock:mode=600") == (
        ["unix", "/x:y.sock"], {"mode": "600"})
    assert _twisted.endpointArguments("tcp:port=1:backlog=9") == (
        ["tcp"], {"port": "1", "backlog": "9"})


# Endpoint descriptions: the udp: and systemd-udp: forms.


def test_pinned_endpoint_description_split() -> None:
    assert _twisted.endpointArguments(r"udp:7:interface=\:\:1") == (
        ["udp", "7"], {"interface": "::1"})
    assert _twisted.endpointArguments("systemd-udp:name=a\\:b") == (
        ["systemd-udp"], {"name": "a:b"})


def test_pinned_systemd_descriptor(monkeypatch) -> None:
    """The systemd: parser's descriptors (read once, at import) and the endpoint's fileno."""
    from twisted.internet import endpoints
    from twisted.python.systemd import ListenFDs

    assert isinstance(endpoints._SystemdParser._sddaemon, ListenFDs)
    monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon",
                        ListenFDs([7, 8], ("echoplug", "echoplug-udp")))
    assert _twisted.systemdDescriptor(reactor, "name=echoplug-udp") == 8
    assert _twisted.systemdDescriptor(reactor, "index=0") == 7
    with pytest.raises(KeyError):
        _twisted.systemdDescriptor(reactor, "name=other")
    with pytest.raises(IndexError):
        _twisted.systemdDescriptor(reactor, "index=2")


# The lean TCP listener (LeanPort, LeanServer): copies of Twisted's accept
# loop and server transport, less the per-connection work. sha256 (first 16
# hex digits) of each copied method's source, as of Twisted 26.10.0: if one
# changes, re-read it, carry the change into echoplug/_twisted.py, and
# update the digest here.
LEAN_TCP_PINNED = {
    "Port.doRead": "d240fc123090ee23",
    "Server.__init__": "fbf83f6f693d6860",
    "Connection.__init__": "162e5439d76f8d2d",
    "Connection.connectionLost": "dd7a9a87035a2084",
    "Server.getPeer": "3e6965712bfcf6d4",
    "Server.__repr__": "048624f9d8dcb3bd",
    "Connection.logPrefix": "7a46f1420988d8d7",
    "Connection.doRead": "20ac74ffecd6b7f2",
    "Connection._dataReceived": "7ed147aeca0c7f8a",
}
#: Not copied, but relied on: closeNow leaves the stops to FileDescriptor's
#: connectionLost, and LeanServer's close to _closeSocket's flag and reset.
LEAN_TCP_RELIED = {
    "FileDescriptor.connectionLost": "1e0b14c7c3f9d02d",
    "_SocketCloser._closeSocket": "9aa82f5b862c8498",
}


@pytest.mark.parametrize("name", LEAN_TCP_RELIED)
def test_lean_tcp_relies_on_unchanged_methods(name: str) -> None:
    from twisted.internet import abstract

    cls, method = name.split(".")
    owner = abstract.FileDescriptor if cls == "FileDescriptor" else tcp._SocketCloser
    source = inspect.getsource(getattr(owner, method))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == LEAN_TCP_RELIED[name], (
        f"Twisted's {name} changed: review echoplug._twisted.closeNow and LeanServer")
    # closeNow leaves the stops to it for every plain transport: each one's
    # connectionLost is Connection's (pinned above), which calls it.
    assert unix.Server.connectionLost is tcp.Connection.connectionLost
    assert tcp.Client._commonConnection is tcp.Connection


@pytest.mark.parametrize("name", LEAN_TCP_PINNED)
def test_lean_tcp_copies_are_of_unchanged_methods(name: str) -> None:
    cls, method = name.split(".")
    source = inspect.getsource(getattr(getattr(tcp, cls), method))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == LEAN_TCP_PINNED[name], (
        f"Twisted's tcp.{name} changed: review echoplug._twisted.LeanPort/LeanServer")


def test_pinned_lean_tcp_internals() -> None:
    """What LeanPort and LeanServer read or set besides the copied methods."""
    import socket

    from twisted.internet.address import IPv4Address
    from twisted.internet.protocol import ServerFactory

    port = tcp.Port(0, ServerFactory(), interface="127.0.0.1")
    port.startListening()
    try:
        sock = _twisted.listeningSocket(port)
        assert isinstance(sock, socket.socket) and sock is port.socket
        assert callable(sock._accept)  # what socket.accept() wraps
        assert port.numberAccepts == 100 and port.sessionno == 0
        assert port._realPortNumber == port.getHost().port
        assert port._buildAddr(("127.0.0.1", 5)) == IPv4Address("TCP", "127.0.0.1", 5)
    finally:
        port.stopListening()
    # The flag _closeSocket reads; the prefix helper logPrefix calls.
    assert tcp.Server._shouldShutdown is True and _twisted.LeanServer._shouldShutdown is False
    assert callable(tcp.Server._getLogPrefix)
    assert tcp.Server._addressType is IPv4Address
    # Python accepts with SOCK_CLOEXEC: LeanServer's close() without a
    # shutdown() relies on no other process holding the socket.
    import fcntl

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()):
            fd, _ = listener._accept()
            try:
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            finally:
                import os

                os.close(fd)
    # The class LeanPort builds for each connection, and the one swapped.
    assert _twisted.LeanPort.transport is _twisted.LeanServer
    assert tcp.Port.transport is tcp.Server


def test_dispatch_inlines_unchanged_read_path() -> None:
    """
    dispatch() takes _doReadOrWrite's steps for a plain read event itself:
    pinned, with the names it reads.
    """
    from twisted.internet import posixbase

    source = inspect.getsource(posixbase._PollLikeMixin._doReadOrWrite)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == "5ffee55b79492b00", (
        "Twisted's _doReadOrWrite changed: review echoplug._twisted.dispatch")
    assert _twisted._NO_FILEDESC is posixbase._NO_FILEDESC
    for cls in (epollreactor.EPollReactor, pollreactor.PollReactor):
        assert cls._doReadOrWrite is posixbase._PollLikeMixin._doReadOrWrite
        assert cls._POLL_IN == 1 and callable(cls._disconnectSelectable)
