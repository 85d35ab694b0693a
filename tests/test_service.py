"""
Tests of L{echoplug.service} in-process with pytest-twisted, on real
loopback sockets: listeners, the start-up line, and the port-in-use error.
Then the hardening, through real twistd processes: the drain on SIGTERM, the
select wall, running out of descriptors, and hostile peers.
"""

from __future__ import annotations

import os
import random
import re
import resource
import selectors
import signal
import socket
import ssl
import stat
import struct
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.logger import globalLogPublisher

from echoplug.factory import EchoFactory
from echoplug.service import EchoService, reactorName
from tests.support import (
    LISTENING,
    REACTORS,
    Server,
    connect,
    freePort,
    recvAll,
    served,
    startProcess,
    twistd,
    twistdCommand,
    waitForPort,
)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


# Hardening, through real twistd processes.



def refusesConnections(port: int, timeout: float = 10.0) -> bool:
    """Wait until nothing listens on C{port} any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("reactorName", REACTORS)
def test_sigterm_drains_then_exits(tmp_path, reactorName: str) -> None:
    with twistd(reactorName, "--drain-timeout", "2", cwd=tmp_path) as server:
        finishing, lingering = connect(server.port), connect(server.port)
        assert served(finishing) and served(lingering)
        server.proc.send_signal(signal.SIGTERM)
        assert refusesConnections(server.port)  # stopped listening at once
        # The open connections still echo, and a half-close still completes.
        assert served(finishing) and served(lingering)
        finishing.sendall(b"last words")
        finishing.shutdown(socket.SHUT_WR)
        assert recvAll(finishing) == b"last words"
        # The other one is closed at the drain timeout, then the process exits.
        lingering.settimeout(15)
        try:
            assert lingering.recv(10) == b""
        except ConnectionResetError:
            pass
        assert server.proc.wait(15) == -signal.SIGTERM  # twistd re-raises it: 143
    out = server.output()
    # 2, or 3 if the first probe of refusesConnections came in just before.
    assert re.search(r"stopped listening; draining [23] connection\(s\), at most 2s", out)
    assert "drain timeout: closed 1 connection(s)" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_sigterm_without_connections_exits_at_once(tmp_path) -> None:
    with twistd(None, "--drain-timeout", "60", cwd=tmp_path) as server:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == -signal.SIGTERM
    assert "draining" not in server.output()


@pytest.mark.slow
@pytest.mark.parametrize(("reactorName", "second"),
                         [(r, signal.SIGTERM) for r in REACTORS] + [("epoll", signal.SIGINT)])
def test_second_signal_ends_the_drain_without_traceback(tmp_path, reactorName: str,
                                                        second: int) -> None:
    with twistd(reactorName, "--drain-timeout", "60", cwd=tmp_path) as server:
        client = connect(server.port)
        assert served(client)
        server.proc.send_signal(signal.SIGTERM)
        server.waitFor("draining 1 connection")
        server.proc.send_signal(second)
        assert server.proc.wait(15) == -signal.SIGTERM
    out = server.output()
    assert "second signal: closed 1 connection(s)" in out
    assert "Traceback" not in out and "ReactorNotRunning" not in out


@pytest.mark.slow
@pytest.mark.parametrize("reactorName", ["epoll", "asyncio", "select"])
def test_sigusr1_logging_to_stdout_does_no_harm(tmp_path, reactorName: str) -> None:
    """Under -n the log is stdout: SIGUSR1 (log rotation) has nothing to rotate."""
    with twistd(reactorName, cwd=tmp_path) as server:
        with connect(server.port) as s:
            assert served(s)  # the reactor runs: its handlers, and echoplug's, are in
            for _ in range(3):
                server.proc.send_signal(signal.SIGUSR1)
            server.waitFor("Received SIGUSR1: no log file to rotate")
            assert served(s)
        assert server.proc.poll() is None
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_sigusr1_still_rotates_a_log_file(tmp_path) -> None:
    """With -l FILE, twistd's own handler rotates it: echoplug leaves that alone."""
    port = freePort()
    argv = [*twistdCommand(), "-n", "--pidfile=", "-l", "echo.log", "echoplug",
            "--port", f"tcp:{port}:interface=127.0.0.1"]
    server = startProcess(argv, tmp_path)
    try:
        waitForPort(server, port)
        with connect(port) as s:
            assert served(s)
        server.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not (tmp_path / "echo.log.1").exists():
            assert time.monotonic() < deadline, "not rotated"
            time.sleep(0.05)
        with connect(port) as s:
            assert served(s)
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert "no log file to rotate" not in (tmp_path / "echo.log.1").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("reactorName", ["epoll", "asyncio", "select"])
def test_sighup_drains_like_sigterm(tmp_path, reactorName: str) -> None:
    with twistd(reactorName, "--drain-timeout", "30", cwd=tmp_path) as server:
        client = connect(server.port)
        assert served(client)
        server.proc.send_signal(signal.SIGHUP)
        server.waitFor("Received SIGHUP, shutting down")
        server.waitFor(r"stopped listening; draining 1 connection\(s\), at most 30s")
        assert refusesConnections(server.port)
        # The open connection still echoes, and its half-close completes.
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert recvAll(client) == b"last words"
        assert server.proc.wait(15) == 0
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_a_second_sighup_ends_the_drain(tmp_path) -> None:
    with twistd(None, "--drain-timeout", "60", cwd=tmp_path) as server:
        client = connect(server.port)
        assert served(client)
        server.proc.send_signal(signal.SIGHUP)
        server.waitFor("draining 1 connection")
        server.proc.send_signal(signal.SIGHUP)
        assert server.proc.wait(15) == 0
    assert "second signal: closed 1 connection(s)" in server.output()


@pytest.mark.slow
def test_an_ignored_sighup_stays_ignored(tmp_path) -> None:
    """Under nohup (SIGHUP ignored), echoplug does not take SIGHUP back."""
    port = freePort()
    argv = ["nohup", *twistdCommand(), "-n", "--pidfile=", "echoplug",
            "--port", f"tcp:{port}:interface=127.0.0.1"]
    server = startProcess(argv, tmp_path)
    try:
        waitForPort(server, port)
        with connect(port) as s:
            assert served(s)
            server.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert served(s)
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert "SIGHUP" not in server.output()


def raiseNoFile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} descriptors; RLIMIT_NOFILE hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.mark.slow
def test_select_wall(tmp_path) -> None:
    """
    1100 clients against -r select: the connections already open keep
    echoing, the excess is refused, no descriptor reaches 1024, and new
    clients are served once the flood is gone.
    """
    raiseNoFile(2400)
    flood: list[socket.socket] = []
    with twistd("select", "--max-connections", "5000", "--drain-timeout", "0",
                cwd=tmp_path) as server:
        server.waitFor("--max-connections 5000 lowered to 960")
        first = [connect(server.port) for _ in range(10)]
        assert all(served(s) for s in first)
        try:
            for _ in range(1100):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", server.port))
                flood.append(s)
            ok, refused = pingAll(flood)
            assert all(served(s) for s in first)
            assert ok <= 960 - len(first)
            assert refused >= 1100 - 960
            assert ok + refused == len(flood)
        finally:
            for s in flood:
                s.close()
        deadline = time.monotonic() + 20
        late = connect(server.port)
        while not served(late) and time.monotonic() < deadline:
            late.close()
            time.sleep(0.1)
            late = connect(server.port)
        assert served(late)
        assert all(served(s) for s in first)
        assert maxFd(server.pid) < 1024
    out = server.output()
    assert "Malformed file descriptor" not in out and "Traceback" not in out


def pingAll(socks: list[socket.socket], timeout: float = 30.0) -> tuple[int, int]:
    """
    Send a byte on every socket and wait for each to echo it or be closed.
    Return (echoed, closed unserved).
    """
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, bool] = {}
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
        pending[s] = False  # not yet sent
    ok = refused = 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            try:
                if not pending[s]:
                    s.send(b"!")
                    pending[s] = True
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                data = s.recv(1)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            sel.unregister(s)
            del pending[s]
            if data == b"!":
                ok += 1
            else:
                refused += 1
    sel.close()
    assert not pending, f"{len(pending)} sockets neither echoed nor closed"
    return ok, refused


def maxFd(pid: int) -> int:
    return max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def limitedTwistd(cwd: object, reactorName: str, soft: int, hard: int) -> Server:
    """twistd echoplug started with RLIMIT_NOFILE at (soft, hard)."""
    launcher = ("import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    argv = [sys.executable, "-c", launcher, *twistdCommand(), "-r", reactorName, "-n",
            "--pidfile=", "echoplug", "--port", "tcp:0:interface=127.0.0.1",
            "--drain-timeout", "0"]
    return startProcess(argv, cwd)


@pytest.mark.slow
def test_soft_descriptor_limit_is_raised(tmp_path) -> None:
    server = limitedTwistd(tmp_path, "epoll", 48, 4096)
    try:
        server.waitFor(r"at most 4032 connections at once \(RLIMIT_NOFILE is 4096")
    finally:
        server.stop()
    server = limitedTwistd(tmp_path, "select", 48, 4096)  # select: no use for more
    try:
        server.waitFor(r"at most 24 connections at once \(RLIMIT_NOFILE is 48")
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("reactorName", REACTORS)
def test_out_of_descriptors_keeps_serving(tmp_path, reactorName: str) -> None:
    """
    With RLIMIT_NOFILE at 48, the server caps itself below it, serves what it
    can, refuses the rest, and keeps serving once they are gone.
    """
    limit = 48
    server = limitedTwistd(tmp_path, reactorName, limit, limit)
    try:
        port = int(server.waitFor(LISTENING.pattern)["port"])
        server.waitFor(r"at most 24 connections at once \(RLIMIT_NOFILE is 48")
        first = connect(port)
        assert served(first)
        flood = [connect(port) for _ in range(2 * limit)]
        ok, refused = pingAll(flood)
        assert ok > 0 and refused > 0
        assert served(first)
        for s in flood:
            s.close()
        deadline = time.monotonic() + 20
        late = connect(port)
        while not served(late) and time.monotonic() < deadline:
            late.close()
            time.sleep(0.1)
            late = connect(port)
        assert served(late)
        assert server.proc.poll() is None
    finally:
        server.stop()
    out = server.output()
    assert "Traceback" not in out
    assert "refused" in out and "EMFILE recovery" not in out


@pytest.mark.slow
@pytest.mark.parametrize("reactorName", REACTORS)
def test_hostile_peers_do_not_disturb_others(tmp_path, reactorName: str) -> None:
    """
    Clients that reset mid-stream, send garbage and leave, or connect and
    vanish: a well-behaved client beside them gets every byte back, and the
    log has no traceback.
    """
    rng = random.Random(862)
    with twistd(reactorName, "--drain-timeout", "0", cwd=tmp_path) as server:
        good = connect(server.port)
        expected = bytearray()
        received = bytearray()
        for i in range(300):
            s = connect(server.port)
            kind = i % 3
            if kind == 0:  # reset mid-stream, with data in flight both ways
                s.sendall(rng.randbytes(rng.randrange(1, 200_000)))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif kind == 1:  # binary garbage, then gone without reading
                s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
            s.close()  # kind 2: connect and vanish
            chunk = rng.randbytes(rng.randrange(1, 2048))
            good.sendall(chunk)
            expected += chunk
            while len(received) < len(expected):
                received += good.recv(65536)
        assert received == expected
        assert served(connect(server.port))
        assert server.proc.poll() is None
    out = server.output()
    assert "Traceback" not in out and "Unhandled" not in out


def selfSigned(directory: Path) -> tuple[Path, Path]:
    """A throw-away key and self-signed certificate for localhost, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    privateKey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(privateKey.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(privateKey, hashes.SHA256())
    )
    key, cert = directory / "key.pem", directory / "cert.pem"
    key.write_bytes(privateKey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.mark.slow
def test_caps_over_tls_close_without_traceback(tmp_path) -> None:
    """TLS wraps the factory: a refusal there must still be a clean close."""
    pytest.importorskip("OpenSSL", reason="the tls extra (pyOpenSSL) is not installed")
    key, cert = selfSigned(tmp_path)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with twistd(None, "--port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1",
                "--max-connections", "1", "--drain-timeout", "0", cwd=tmp_path) as server:
        first = context.wrap_socket(connect(server.port))
        assert served(first)
        try:
            secondServed = served(context.wrap_socket(connect(server.port)))
        except OSError:  # ssl.SSLError is one: the handshake was cut
            secondServed = False
        assert not secondServed
        assert served(first)
        server.waitFor(r"refused 127\.0\.0\.1:\d+: at --max-connections 1")
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_access_line_counts_what_a_tls_client_never_read(tmp_path) -> None:
    """
    A TLS client that writes and reads nothing: the access line says how
    much was received and how much less was sent, not that all was echoed.
    """
    pytest.importorskip("OpenSSL", reason="the tls extra (pyOpenSSL) is not installed")
    key, cert = selfSigned(tmp_path)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with twistd(None, "--port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1",
                "--idle-timeout", "1", cwd=tmp_path) as server:
        raw = connect(server.port)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s = context.wrap_socket(raw)
        s.settimeout(0.5)
        block = b"z" * 65536
        pushed = 0
        end = time.monotonic() + 10
        while pushed < 32 << 20 and time.monotonic() < end:
            try:
                s.sendall(block)  # until the server stops reading
            except TimeoutError:
                break
            pushed += len(block)
        m = server.waitFor(r"close 127\.0\.0\.1:\d+ after [\d.]+s, (?P<received>\d+) bytes "
                           r"received, (?P<sent>\d+) bytes sent, idle timeout", timeout=15)
        raw.close()
    received, sent = int(m["received"]), int(m["sent"])
    assert 0 < received <= pushed + len(block)
    # What waited in the TLS layer's buffer when the connection was cut was
    # never sent.
    assert sent < received - 32768


@pytest.mark.slow
def test_unix_clients_with_four_character_names(tmp_path, monkeypatch) -> None:
    """
    Twisted's accept loop takes a 4-character UNIX peer name for an IPv6
    address and raises: every such client was reset, with a traceback
    each. The listener guards its UNIX ports, however many clients try.
    """
    sock = tmp_path / "echo.sock"
    monkeypatch.chdir(tmp_path)  # the relative names bind here
    with twistd(None, "--port", "tcp:0:interface=127.0.0.1", "--port", f"unix:{sock}",
                cwd=tmp_path) as server:
        names: list[str | bytes] = [f"c{i:03d}" for i in range(20)]
        names += [f"\0a{i:02d}".encode() for i in range(20)]  # abstract: b"\0a00"
        names += ["ab", "abcde"]  # other lengths, as before
        for name in names:
            with socket.socket(socket.AF_UNIX) as u:
                u.settimeout(10)
                u.bind(name)
                u.connect(str(sock))
                assert served(u), name
        server.waitFor(r"close c019 after")
    out = server.output()
    assert "Traceback" not in out and "Unhandled Error" not in out
    assert out.count(" bytes ") >= len(names)


def completedConnects(port: int, tries: int, wait: float = 1.0) -> int:
    """Start C{tries} connects at once; count those the kernel completes in C{wait} s."""
    socks = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(tries):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_WRITE)
            socks.append(s)
        done: set[socket.socket] = set()
        deadline = time.monotonic() + wait
        while len(done) < tries and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                sel.unregister(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.add(s)
        return len(done)
    finally:
        for s in socks:
            s.close()
        sel.close()


@pytest.mark.slow
@pytest.mark.parametrize(("options", "queued"), [((), 300), (("--backlog", "20"), 21)])
def test_listen_backlog(tmp_path, options: tuple[str, ...], queued: int) -> None:
    """
    A bare port listens with a backlog of 4096 (Twisted's default is 50):
    with the server stopped (SIGSTOP), the kernel completes as many connects
    as the backlog holds, plus one; the rest wait for SYN retransmits.
    """
    with twistd(None, "--port", "0", *options, cwd=tmp_path, wait=False) as server:
        port = int(server.waitFor(LISTENING.pattern)["port"])
        os.kill(server.pid, signal.SIGSTOP)
        try:
            assert completedConnects(port, 300) == queued
        finally:
            os.kill(server.pid, signal.SIGCONT)


@pytest.mark.slow
def test_unix_socket_file_mode(tmp_path) -> None:
    """Owner and group may connect, others not (Twisted's default is 0666); mode= wins."""
    default, chosen = tmp_path / "a.sock", tmp_path / "b.sock"
    with twistd(None, "--port", f"unix:{default}", "--port", f"unix:{chosen}:mode=600",
                cwd=tmp_path, wait=False) as server:
        server.waitFor(rf"listening on {chosen}")
        assert stat.S_IMODE(default.stat().st_mode) == 0o660
        assert stat.S_IMODE(chosen.stat().st_mode) == 0o600
