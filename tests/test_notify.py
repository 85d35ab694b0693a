"""
Tests of L{echoplug.notify}: the sd_notify datagrams, sent to a
C{NOTIFY_SOCKET} the test binds itself (a path and an abstract name), by
L{notify} in-process and by a real C{twistd echoplug} under the environment
systemd would give it.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from echoplug.factory import EchoFactory
from echoplug.notify import (
    NotifyError,
    SystemdNotifier,
    notify,
    socketAddress,
    watchdogInterval,
)
from echoplug.service import EchoService
from tests.support import NotifyReceiver, connect, freePort, recvAll, twistd


def test_socket_address() -> None:
    assert socketAddress("/run/systemd/notify") == "/run/systemd/notify"
    assert socketAddress("@sd-notify") == "\0sd-notify"
    for bad in ("relative/path", "@", "vsock:2:1234"):
        with pytest.raises(NotifyError):
            socketAddress(bad)


def test_watchdog_interval() -> None:
    assert watchdogInterval({}, 7) is None
    assert watchdogInterval({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdogInterval({"WATCHDOG_USEC": "junk"}, 7) is None
    assert watchdogInterval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert watchdogInterval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 15.0
    assert watchdogInterval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None


def test_not_under_systemd() -> None:
    assert notify("READY=1", {}) is False
    assert SystemdNotifier.fromEnvironment(EchoService(EchoFactory()), {}) is None


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_datagram(tmp_path, abstract: bool) -> None:
    name = f"@echoplug-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    receiver = NotifyReceiver(name)
    try:
        assert notify("READY=1\nSTATUS=up", receiver.env) is True
        assert receiver.waitFor("READY=1") == "READY=1\nSTATUS=up"
    finally:
        receiver.close()


def test_notify_without_listener_is_an_error(tmp_path) -> None:
    with pytest.raises(NotifyError, match="cannot notify"):
        notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_status_only_when_changed(tmp_path) -> None:
    receiver = NotifyReceiver(str(tmp_path / "notify"))
    factory = EchoFactory()
    notifier = SystemdNotifier(EchoService(factory), receiver.env, watchdog=None)
    try:
        notifier.status = notifier.statusLine()
        notifier.tick()
        assert notifier.sent == []  # no watchdog, nothing changed: no datagram
        factory.accepted = 3
        factory.refused = 1
        notifier.tick()
        assert notifier.sent == ["STATUS=connections: 0 open, 3 accepted, 1 refused"]
        notifier.watchdog = 1.0
        notifier.tick()
        assert notifier.sent[-1] == "WATCHDOG=1"
    finally:
        receiver.close()


def listens(port: int) -> bool:
    try:
        connect(port, timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("abstract", [False, True])
def test_twistd_ready_watchdog_status_stopping(tmp_path, abstract: bool) -> None:
    """
    READY=1 comes only when both echo ports and the metrics port accept
    connections; then watchdog
    pings, a STATUS= line that counts an open connection, and STOPPING=1
    on SIGTERM.
    """
    name = f"@echoplug-twistd-{os.getpid()}" if abstract else str(tmp_path / "notify")
    receiver = NotifyReceiver(name)
    ports = [freePort(), freePort(), freePort()]
    env = {**receiver.env, "WATCHDOG_USEC": "200000"}
    try:
        with twistd(None, "--port", str(ports[0]), "--port", str(ports[1]),
                    "--metrics", str(ports[2]), cwd=tmp_path, env=env, wait=False) as server:
            ready = receiver.waitFor("READY=1")
            assert all(listens(p) for p in ports), server.output()
            assert "STATUS=connections: 0 open, 0 accepted, 0 refused" in ready.splitlines()
            receiver.waitFor("WATCHDOG=1")
            with connect(ports[0]) as s:
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
                receiver.waitFor("STATUS=connections: 1 open, 3 accepted, 0 refused")
            assert server.stop() in (0, -15)
        stopping = receiver.waitFor("STOPPING=1")
        assert receiver.drain()[-1] == stopping
        assert server.output().count(
            "told systemd READY=1 (3 listening; watchdog and status every 0.1s)") == 1
    finally:
        receiver.close()


@pytest.mark.slow
def test_no_ready_when_a_port_fails(tmp_path) -> None:
    receiver = NotifyReceiver(str(tmp_path / "notify"))
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with twistd(None, "--port", str(freePort()), "--port", str(port),
                        cwd=tmp_path, env=receiver.env, wait=False) as server:
                assert server.proc.wait(30) != 0
        assert "Address already in use" in server.output()
        assert not any("READY=1" in m.splitlines() for m in receiver.drain())
    finally:
        receiver.close()


@pytest.mark.slow
def test_watchdog_pid_of_another_process(tmp_path) -> None:
    """WATCHDOG_PID names another process: READY=1 but never WATCHDOG=1."""
    receiver = NotifyReceiver(str(tmp_path / "notify"))
    env = {**receiver.env, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
    try:
        with twistd(None, cwd=tmp_path, env=env) as server:
            receiver.waitFor("READY=1")
            # Hold a connection so that a STATUS= line is due, then end it:
            # the datagrams in between would carry WATCHDOG=1 if it were on.
            with connect(server.port) as s:
                s.sendall(b"x")
                assert s.recv(1) == b"x"
                receiver.waitFor("STATUS=connections: 1 open, 1 accepted, 0 refused")
        receiver.waitFor("STOPPING=1")
        assert not any("WATCHDOG=1" in m.splitlines() for m in receiver.messages)
    finally:
        receiver.close()


@pytest.mark.slow
def test_bad_notify_socket_is_one_line(tmp_path) -> None:
    with twistd(None, cwd=tmp_path, env={"NOTIFY_SOCKET": "not/absolute"},
                wait=False) as server:
        assert server.proc.wait(30) != 0
    out = server.output()
    assert "Traceback" not in out
    assert "echoplug: NOTIFY_SOCKET='not/absolute' is neither an absolute path" in out


@pytest.mark.slow
def test_stopping_is_sent_when_the_drain_begins(tmp_path) -> None:
    """
    STOPPING=1 comes as shutdown begins, not when it ends: a connection
    still open in the drain gets its echo after systemd has been told.
    """
    receiver = NotifyReceiver(str(tmp_path / "notify"))
    try:
        with twistd(None, "--drain-timeout", "30", cwd=tmp_path, env=receiver.env) as server:
            receiver.waitFor("READY=1")
            with connect(server.port) as s:
                s.sendall(b"before")
                assert s.recv(6) == b"before"
                server.proc.send_signal(signal.SIGTERM)
                stopping = receiver.waitFor("STOPPING=1")
                assert "STATUS=stopping, connections: 1 open, 1 accepted, 0 refused" in (
                    stopping.splitlines())
                s.sendall(b"during the drain")
                s.shutdown(socket.SHUT_WR)
                assert recvAll(s) == b"during the drain"
                assert server.proc.poll() is None
            assert server.proc.wait(30) in (0, -15)
    finally:
        receiver.close()
