"""
Tests of L{echoplug.reactors}: the lean reactors are found by twistd, dispatch
like Twisted's (a failing connection is logged and dropped, the others go
on); the Twisted code they copy or rely on is pinned in tests/test__twisted.py.
Echo behaviour on each lean reactor is covered by every per-reactor test
(tests.support.REACTORS).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import epollreactor, pollreactor, selectreactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from echoplug.reactors.epoll import LeanEPollReactor
from echoplug.reactors.poll import LeanPollReactor
from echoplug.reactors.select import LeanSelectReactor
from echoplug.service import reactorName
from tests.support import testEnv, twistd, twistdCommand

LEAN = {
    "echoplug-epoll": (LeanEPollReactor, epollreactor.EPollReactor, "doPoll"),
    "echoplug-poll": (LeanPollReactor, pollreactor.PollReactor, "doPoll"),
    "echoplug-select": (LeanSelectReactor, selectreactor.SelectReactor, "doSelect"),
}

@pytest.fixture(params=list(LEAN))
def lean(request) -> Iterator[Any]:
    cls = LEAN[request.param][0]
    reactor = cls()  # not installed: driven by hand with doIteration
    yield reactor
    if reactor.waker is not None:
        reactor._removeInternalReader(reactor.waker)
        reactor.waker.connectionLost(None)
    poller = getattr(reactor, "_poller", None)
    if hasattr(poller, "close"):
        poller.close()


class Conn(FileDescriptor):
    """One end of a socketpair, as a reactor sees a connection."""

    def __init__(self, reactor: Any, sock: socket.socket, fail: str = "") -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.read = b""
        self.lost: Failure | None = None
        self.connected = 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return f"Conn-{self.fail or 'ok'}"

    def doRead(self) -> None:
        self.read += self.sock.recv(100)
        if self.fail == "doRead":
            raise RuntimeError("doRead failed")

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.lost = reason
        if self.fail == "connectionLost":
            raise RuntimeError("connectionLost failed too")


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


@pytest.mark.parametrize("fail", ["doRead", "connectionLost"])
def test_failing_connection_is_logged_and_dropped_others_go_on(lean, fail: str) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    socks = [pair(), pair()]
    try:
        bad = Conn(lean, socks[0][0], fail="doRead")
        if fail == "connectionLost":
            bad.fail = "connectionLost"
            bad.doRead = lambda: (_ for _ in ()).throw(RuntimeError("doRead failed"))
        good = Conn(lean, socks[1][0])
        lean.addReader(bad)
        lean.addReader(good)
        socks[0][1].send(b"boom")
        socks[1][1].send(b"fine")
        for _ in range(10):  # bounded
            lean.doIteration(0.1)
            if good.read and bad.lost is not None:
                break
        assert good.read == b"fine" and good.lost is None
        assert bad.lost is not None and bad.lost.check(RuntimeError)
        assert bad not in lean.getReaders()
        # log.err's legacy event, as the global publisher passes it on.
        failures = [e for e in events if e.get("failure") is not None]
        assert any(e["failure"].check(RuntimeError) for e in failures)
        if fail == "connectionLost":
            # Escaped _doReadOrWrite: logged with the connection's prefix, as
            # log.callWithLogger did.
            assert any(e.get("system") == "Conn-connectionLost" for e in failures)
    finally:
        globalLogPublisher.removeObserver(events.append)
        lean.removeAll()
        for a, b in socks:
            a.close()
            b.close()


def test_clean_eof_is_connection_done(lean) -> None:
    a, b = pair()
    try:
        conn = Conn(lean, a)
        conn.doRead = lambda: None if a.recv(100) else ConnectionDone()  # type: ignore
        lean.addReader(conn)
        b.close()
        for _ in range(10):  # bounded
            lean.doIteration(0.1)
            if conn.lost is not None:
                break
        assert conn.lost is not None and conn.lost.check(ConnectionDone)
    finally:
        lean.removeAll()
        a.close()


@pytest.mark.slow
def test_twistd_lists_the_lean_reactors(tmp_path) -> None:
    result = subprocess.run([*twistdCommand(), "--help-reactors"], capture_output=True,
                            text=True, cwd=tmp_path, env=testEnv(), timeout=60)
    available = result.stdout.split("reactors not available")[0]
    for name in LEAN:
        assert f"    {name}\t" in available, result.stdout


@pytest.mark.parametrize("name", LEAN)
def test_reactor_name_of_lean_reactors(name: str) -> None:
    # The start-up line names them as twistd -r does.
    assert reactorName(LEAN[name][0]()) == name


@pytest.mark.slow
def test_access_log_unchanged_on_lean_reactor(tmp_path) -> None:
    with twistd("echoplug-epoll", cwd=tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"abc")
            assert s.recv(10) == b"abc"
        m = server.waitFor(r"\[(\S+)\] close 127\.0\.0\.1:\d+ after \d+\.\d{3}s, "
                           r"3 bytes received, 3 bytes sent, closed")
        assert m[1] == "echoplug.factory.EchoFactory#info"


@pytest.mark.slow
def test_in_process_tests_run_on_a_lean_reactor(tmp_path) -> None:
    """ECHOPLUG_TEST_REACTOR (tests/conftest.py) runs pytest-twisted tests on it."""
    from tests.support import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_eager.py", "tests/test_service.py::test_reactor_name_of_installed_reactor"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=testEnv({"ECHOPLUG_TEST_REACTOR": "echoplug-epoll"}))
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("reactor", "hinted"), [("select", True), ("echoplug-select", False),
                                                 ("poll", False)])
def test_select_startup_points_at_the_lean_select(tmp_path, reactor: str, hinted: bool) -> None:
    """Under Twisted's own select reactor the start-up log names the faster one, once."""
    with twistd(reactor, cwd=tmp_path) as server:
        pass
    assert server.output().count("-r echoplug-select is the faster select reactor") == hinted
