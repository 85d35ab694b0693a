"""
Tests of L{echoplug.service} in-process with pytest-twisted, on real
loopback sockets: listeners, the start-up line, and the port-in-use error.
"""

from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.logger import globalLogPublisher

from echoplug.factory import EchoFactory
from echoplug.service import EchoService, reactorName
from tests.support import twistd


def test_reactor_name_of_installed_reactor() -> None:
    # tests/conftest.py: ECHOPLUG_TEST_REACTOR, else pytest-twisted's epoll.
    assert reactorName(reactor) == (os.environ.get("ECHOPLUG_TEST_REACTOR") or "epoll")


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done = pytest_twisted.defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data)


@pytest_twisted.inlineCallbacks
def test_two_listeners_share_one_factory():
    events = []
    globalLogPublisher.addObserver(events.append)
    factory = EchoFactory()
    service = EchoService(factory)
    for _ in range(2):
        service.listen("tcp:0", serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    service.privilegedStartService()
    service.startService()
    try:
        ports = yield service.whenListening()
        assert len(ports) == 2
        for port in ports:
            proto = Collect()
            ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            p = yield ep.connect(protocol.Factory.forProtocol(lambda proto=proto: proto))
            p.transport.write(b"over half-close")
            p.transport.loseWriteConnection()
            assert (yield proto.done) == b"over half-close"
        assert factory.accepted == 2
    finally:
        yield service.stopService()
        globalLogPublisher.removeObserver(events.append)
    lines = [e.get("log_format", "") for e in events]
    assert lines.count("listening on {address}, reactor={reactor} ({cls})") == 2


def test_port_in_use_is_one_line(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with twistd(None, "--port", str(port), cwd=tmp_path, wait=False) as server:
            assert server.proc.wait(30) != 0
    out = server.output()
    assert "Traceback" not in out
    assert f"echoplug: cannot listen on tcp:{port}:interface=127.0.0.1" in out
    assert "Address already in use" in out


@pytest.mark.parametrize("flag", ["--port"])
def test_multiple_ports_from_twistd(tmp_path, flag: str) -> None:
    sock = tmp_path / "echo.sock"
    with twistd(None, flag, "tcp:0:interface=127.0.0.1", flag, f"unix:{sock}",
                cwd=tmp_path) as server:
        server.waitFor(rf"listening on {sock}")
        with socket.socket(socket.AF_UNIX) as u:
            u.settimeout(10)
            u.connect(str(sock))
            u.sendall(b"unix echo")
            assert u.recv(100) == b"unix echo"
