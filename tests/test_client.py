"""
Tests of C{echoplug-client} as a user runs it: against a real twistd, on
each reactor, and against servers that refuse, stall, cut or corrupt.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading

import pytest

from echoplug.client import MESSAGES
from tests.support import REACTORS, testEnv, twistd

LINE = re.compile(r"^\('127\.0\.0\.1', (\d+)\): (sending|received) \"(.*)\"$")


def runClient(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "echoplug.client", *args],
                          capture_output=True, text=True, timeout=timeout, env=testEnv())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with twistd("epoll", cwd=tmp_path_factory.mktemp("client")) as s:
        yield s


@pytest.mark.slow
def test_reproduces_the_original_conversation(server) -> None:
    """Two sockets; each message sent on both, then received on both."""
    result = runClient("--port", str(server.port))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * 2 * len(MESSAGES)
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    socks = [parsed[0][1], parsed[1][1]]
    assert socks[0] != socks[1]
    expected = []
    for message in MESSAGES:
        expected += [(p, "sending", message) for p in socks]
        expected += [(p, "received", message) for p in socks]
    assert [(m[1], m[2], m[3]) for m in parsed] == expected


@pytest.mark.slow
@pytest.mark.parametrize("reactor", REACTORS)
def test_every_reactor_on_both_sides(tmp_path, reactor: str) -> None:
    with twistd(reactor, cwd=tmp_path) as s:
        result = runClient("--port", str(s.port), "--reactor", reactor, "--connections", "5",
                           "--message", "x" * 100_000, "--message", "héllo ✓")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("received") == 10


@pytest.mark.slow
def test_console_script_is_installed(server) -> None:
    exe = __import__("shutil").which("echoplug-client") or str(
        __import__("pathlib").Path(sys.executable).with_name("echoplug-client"))
    result = subprocess.run([exe, "--port", str(server.port), "--connections", "1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def oneLineError(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        oneLineError(runClient("--port", str(port)), "Connection refused")


def test_timeout_when_nothing_comes_back() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # the kernel accepts; nobody ever answers
        result = runClient("--port", str(s.getsockname()[1]), "--timeout", "0.5")
    oneLineError(result, "timed out after 0.5s")


def fakeServer(reply: bytes | None) -> tuple[int, threading.Thread]:
    """Accept one connection, read once, answer C{reply} (or close) and hang up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                if reply is not None:
                    conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return listener.getsockname()[1], t


@pytest.mark.slow
def test_mismatch_is_reported() -> None:
    port, t = fakeServer(b"THIS IS NOT THE MESSAGE")
    result = runClient("--port", str(port), "--connections", "1", "--message", "the message")
    t.join(5)
    oneLineError(result, "echo mismatch")


@pytest.mark.slow
def test_server_hangs_up_early() -> None:
    port, t = fakeServer(b"half")
    result = runClient("--port", str(port), "--connections", "1", "--message", "whole message")
    t.join(5)
    oneLineError(result, "connection closed after 4 of 13 bytes")


@pytest.mark.parametrize(
    "args", [["--port", "0"], ["--port", "http"], ["--connections", "0"], ["--timeout", "-1"],
             ["--message", ""], ["--bogus"]],
)
def test_bad_options(args: list[str]) -> None:
    result = runClient(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("echoplug-client: error:")


def test_unknown_reactor() -> None:
    oneLineError(runClient("--reactor", "nope"), "no such reactor")


# --udp


@pytest.fixture(scope="module")
def udpServer(tmp_path_factory):
    with twistd("epoll", "--port", "udp:0", cwd=tmp_path_factory.mktemp("udp")) as s:
        yield s


@pytest.mark.slow
def test_udp_reproduces_the_original_conversation(udpServer) -> None:
    result = runClient("--udp", "--port", str(udpServer.port))
    assert result.returncode == 0, result.stderr
    parsed = [LINE.match(line) for line in result.stdout.splitlines()]
    assert all(parsed) and len(parsed) == 2 * 2 * len(MESSAGES), result.stdout
    socks = [parsed[0][1], parsed[1][1]]
    expected = []
    for message in MESSAGES:
        expected += [(p, "sending", message) for p in socks]
        expected += [(p, "received", message) for p in socks]
    assert [(m[1], m[2], m[3]) for m in parsed] == expected


@pytest.mark.slow
@pytest.mark.parametrize("reactor", ["select", "poll", "epoll", "asyncio"])
def test_udp_client_on_each_reactor(udpServer, reactor: str) -> None:
    result = runClient("--udp", "--port", str(udpServer.port), "--reactor", reactor,
                       "--connections", "3", "--message", "x" * 65_000,
                       "--message", "héllo ✓")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("received") == 6


@contextlib.contextmanager
def datagramServer(handle):
    """A UDP server on loopback that answers each datagram with C{handle(n, data)}."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()
    seen = []

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(1 << 16)
            except OSError:
                continue
            seen.append(data)
            for answer in handle(len(seen), data):
                sock.sendto(answer, addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], seen
    finally:
        stop.set()
        thread.join()
        sock.close()


@pytest.mark.slow
def test_udp_resends_a_lost_datagram() -> None:
    # Loses every other datagram, and answers some twice.
    with datagramServer(lambda n, data: [] if n % 2 else [data, data]) as (port, seen):
        result = runClient("--udp", "--port", str(port), "--connections", "1",
                           "--timeout", "6", "--retries", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("received") == 3
    assert len(seen) == 6  # each message sent twice


@pytest.mark.slow
def test_udp_loss_is_one_line() -> None:
    with datagramServer(lambda n, data: []) as (port, seen):
        result = runClient("--udp", "--port", str(port), "--connections", "1",
                           "--timeout", "1", "--retries", "2")
    oneLineError(result, "lost: no echo of b'This is the message. '")
    assert "after 2 resends in 1s" in result.stderr
    assert len(seen) == 3


@pytest.mark.slow
def test_udp_mismatch_is_one_line() -> None:
    with datagramServer(lambda n, data: [data[:-1] + b"?"]) as (port, _):
        result = runClient("--udp", "--port", str(port), "--timeout", "2")
    oneLineError(result, "echo mismatch")


@pytest.mark.slow
@pytest.mark.parametrize("reactor", ["select", "epoll"])
def test_udp_nothing_listening_is_one_line(reactor: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = runClient("--udp", "--port", str(port), "--reactor", reactor, "--timeout", "5")
    oneLineError(result, "port unreachable: nothing listens for UDP there")


def test_udp_message_too_large_is_a_usage_error() -> None:
    result = runClient("--udp", "--message", "x" * 65_508)
    assert result.returncode == 2
    assert "at most 65507 bytes" in result.stderr
