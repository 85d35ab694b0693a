"""
Tests of C{--workers} (L{echoplug.workers}, L{echoplug.worker}) against
real twistd processes: the spread of connections, a worker killed under
load, the drain, the parent killed, the metrics summed, every reactor, and
bad values.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from echoplug.lab import procs
from echoplug.tap import Options
from echoplug.workers import workerCount
from tests.support import (
    REACTORS,
    NotifyReceiver,
    Server,
    connect,
    echoHalfClose,
    freePort,
    halfCloseOn,
    startProcess,
    testEnv,
    twistd,
    twistdCommand,
)

WORKER = re.compile(r"worker (?P<n>\d+) started, pid (?P<pid>\d+)")
ALL = r"all (?P<count>\d+) workers listening"
METRICS = r"serving metrics on 127\.0\.0\.1:(?P<port>\d+)"


@contextlib.contextmanager
def workers(tmp_path: Path, *options: str, count: int = 2, reactor: str | None = None,
            env: dict[str, str] | None = None) -> Iterator[Server]:
    """C{twistd echoplug --workers COUNT OPTIONS}, once every worker listens."""
    with twistd(reactor, "--workers", str(count), *options, cwd=tmp_path, env=env) as server:
        server.waitFor(ALL, timeout=30)
        yield server


def workerPids(server: Server) -> dict[int, int]:
    """The latest pid of each worker, from the parent's start-up lines."""
    return {int(m["n"]): int(m["pid"]) for m in WORKER.finditer(server.output())}


def scrape(server: Server) -> dict[str, float]:
    port = server.waitFor(METRICS)["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to reap it.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def waitUntil(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_workers_values() -> None:
    assert workerCount("1") == 1
    assert workerCount(" 4 ") == 4
    assert workerCount("auto") == len(os.sched_getaffinity(0))
    options = Options()
    options.parseOptions([])
    assert options["workers"] == 1
    assert "--worker=" not in options.getUsage() and "--workers=" in options.getUsage()


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", ""])
def test_bad_workers_value_is_one_line(tmp_path, value: str) -> None:
    done = subprocess.run(
        [*twistdCommand(), "-n", "--pidfile=", "echoplug", "--workers", value],
        cwd=tmp_path, env=testEnv(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "--workers" in lines[0], lines


def test_workers_need_stdout_logging(tmp_path) -> None:
    done = subprocess.run(
        [*twistdCommand(), "-n", "--pidfile=", "-l", str(tmp_path / "x.log"), "echoplug",
         "--workers", "2"], cwd=tmp_path, env=testEnv(), capture_output=True, text=True,
        timeout=60)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "--logfile" in lines[0], lines


@pytest.mark.slow
def test_spread_and_metrics_summed(tmp_path) -> None:
    """200 connections from one client: each worker serves at least 30% of
    them, and the accepted counter reads 200."""
    with workers(tmp_path, "--metrics", "tcp:0:interface=127.0.0.1") as server:
        held = []
        try:
            for i in range(200):
                s = connect(server.port)
                s.sendall(b"%d" % i)
                assert s.recv(16) == b"%d" % i
                held.append(s)
            values = scrape(server)
        finally:
            for s in held:
                s.close()
        assert values["echoplug_connections_accepted_total"] == 200
        assert values["echoplug_connections_open"] == 200
        per = [values[f'echoplug_worker_connections_accepted_total{{worker="{n}"}}']
               for n in (1, 2)]
        assert sum(per) == 200 and min(per) >= 60, per
        waitUntil(lambda: scrape(server)["echoplug_connections_open"] == 0, 5, "all closed")
        # A worker killed: its connections stay counted, its successor counts anew.
        os.kill(workerPids(server)[1], signal.SIGKILL)
        server.waitFor(r"worker 1 \(pid \d+\) killed by signal 9")
        waitUntil(lambda: server.output().count("worker 1 started") == 2, 5, "restarted")
        assert scrape(server)["echoplug_connections_accepted_total"] == 200
        assert scrape(server)['echoplug_worker_restarts_total{worker="1"}'] == 1


class SteadyLoad:
    """Connect, echo, close, in a few threads, until stopped: bounded in
    count and time. Records what went wrong, by kind."""

    def __init__(self, port: int, threads: int = 3, limit: int = 20000,
                 seconds: float = 20.0) -> None:
        self.port = port
        self.done = 0
        self.refused = 0
        self.mismatched = 0
        self.reset = 0
        self.limit = limit
        self.end = time.monotonic() + seconds
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(t,), daemon=True)
                        for t in range(threads)]

    def run(self, t: int) -> None:
        i = 0
        while not self.stopping.is_set() and self.done < self.limit \
                and time.monotonic() < self.end:
            i += 1
            message = f"{t}:{i}".encode()
            try:
                with connect(self.port, timeout=5) as s:
                    s.sendall(message)
                    got = s.recv(64)
            except ConnectionRefusedError:
                self.refused += 1
                continue
            except OSError:
                self.reset += 1  # in flight on the worker that was killed
                continue
            if got != message:
                self.mismatched += 1
            self.done += 1

    def __enter__(self) -> SteadyLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)


@pytest.mark.slow
def test_worker_killed_under_load(tmp_path) -> None:
    with workers(tmp_path) as server, \
            SteadyLoad(server.port) as load:
        waitUntil(lambda: load.done > 50, 10, "load under way")
        victim = workerPids(server)[2]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        server.waitFor(r"worker 2 \(pid \d+\) killed by signal 9 \(SIGKILL\); "
                       r"restarting it in 0\.\ds")
        server.waitFor(rf"worker 2 \(pid (?!{victim})\d+\) listening", timeout=10)
        back = time.monotonic() - killed
        before = load.done
        waitUntil(lambda: load.done > before + 50, 10, "load after the restart")
    assert back < 2.0, f"worker back after {back:.2f}s"
    assert load.refused == 0 and load.mismatched == 0
    # Only connections in flight on the killed worker may be cut.
    assert load.reset <= len(load.threads)
    lines = [line for line in server.lines if "killed by signal 9" in line]
    assert len(lines) == 1


@pytest.mark.slow
def test_drain_across_workers(tmp_path) -> None:
    with workers(tmp_path, "--drain-timeout", "2",
                 "--metrics", "tcp:0:interface=127.0.0.1") as server:
        held = []
        for _ in range(20):
            s = connect(server.port)
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            held.append(s)
        per = [scrape(server)[f'echoplug_worker_connections_open{{worker="{n}"}}']
               for n in (1, 2)]
        assert min(per) > 0, per  # both workers have some to drain
        pids = workerPids(server)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Draining: open connections still echo; new ones are not served.
        for s in held:
            s.sendall(b"y")
            assert s.recv(1) == b"y"
        with pytest.raises(ConnectionRefusedError):
            connect(server.port, timeout=2)
        for s in held[:10]:
            s.close()
        # The other half never close: cut at the drain timeout.
        status = server.proc.wait(10)
        took = time.monotonic() - started
        for s in held[10:]:
            s.close()
    assert status in (0, -signal.SIGTERM)
    assert 1.9 < took < 3.0 + 0.5, took  # drain timeout + 1 s, with slack for the load
    assert not any(alive(pid) for pid in pids.values())


@pytest.mark.slow
def test_second_sigterm_ends_the_drain(tmp_path) -> None:
    with workers(tmp_path, "--drain-timeout", "60") as server:
        held = [connect(server.port) for _ in range(6)]
        for s in held:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(10)
        assert time.monotonic() - started < 3
        for s in held:
            s.close()
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_reload_signals_leave_the_workers_alone(tmp_path) -> None:
    with workers(tmp_path) as server:
        pids = workerPids(server)
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            server.proc.send_signal(sig)
            server.waitFor(rf"{sig.name} ignored: echoplug has no reload")
        assert server.proc.poll() is None and workerPids(server) == pids
        assert all(alive(pid) for pid in pids.values())
        with connect(server.port) as s:
            s.sendall(b"still")
            assert s.recv(5) == b"still"


@pytest.mark.slow
def test_parent_killed_leaves_no_orphans(tmp_path) -> None:
    with workers(tmp_path) as server:
        held = connect(server.port)  # a connection to drain, briefly
        pids = list(workerPids(server).values())
        assert len(pids) == 2 and all(alive(p) for p in pids)
        server.proc.kill()
        server.proc.wait()
        held.close()
        waitUntil(lambda: not any(alive(p) for p in pids), 8, f"workers {pids} gone")
    assert "Traceback" not in server.output()


@pytest.mark.slow
@pytest.mark.parametrize("reactor", REACTORS)
def test_every_reactor(tmp_path, reactor: str) -> None:
    with workers(tmp_path, reactor=reactor) as server:
        assert server.output().count(f"reactor={reactor} ") >= 1
        data = [os.urandom(1000) for _ in range(30)]
        assert echoHalfClose(server.port, data) == b"".join(data)
        for _ in range(20):
            with connect(server.port) as s:
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
        assert server.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in server.output()


EPOLLEXCLUSIVE = 1 << 28


def epollFlags(pid: int) -> list[int]:
    """The event masks of every descriptor in the epoll sets of process C{pid}."""
    masks = []
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            for line in info.read_text().splitlines():
                if line.startswith("tfd:"):
                    masks.append(int(line.split("events:")[1].split()[0], 16))
    return masks


@pytest.mark.slow
@pytest.mark.parametrize("reactor", ["epoll", "echoplug-epoll"])
def test_epoll_workers_wake_one_at_a_time(tmp_path, reactor: str) -> None:
    """Under epoll each worker waits on the shared socket with EPOLLEXCLUSIVE,
    also after the fair share paused and resumed it."""
    with workers(tmp_path, reactor=reactor) as server:
        for pid in workerPids(server).values():
            assert any(m & EPOLLEXCLUSIVE for m in epollFlags(pid)), epollFlags(pid)
        held = [connect(server.port) for _ in range(40)]
        for s in held:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        for s in held:
            s.close()
        time.sleep(0.3)
        for pid in workerPids(server).values():
            assert sum(bool(m & EPOLLEXCLUSIVE) for m in epollFlags(pid)) == 1


@pytest.mark.slow
def test_a_worker_stopping_alone_leaves_the_sockets(tmp_path) -> None:
    """A worker that stops alone (SIGTERM to it) leaves the shared sockets
    listening for the others and its successor: the TCP socket, and the UNIX
    socket's path with its mode."""
    path = tmp_path / "echo.sock"
    with workers(tmp_path, "--port", "tcp:0:interface=127.0.0.1",
                 "--port", f"unix:{path}:mode=660") as server:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        os.kill(workerPids(server)[1], signal.SIGTERM)
        server.waitFor(r"worker 1 \(pid \d+\) stopped \(SIGTERM\); restarting")
        for _ in range(10):
            with connect(server.port) as s:
                s.sendall(b"tcp")
                assert s.recv(3) == b"tcp"
        waitUntil(lambda: server.output().count("worker 1 (pid") >= 3, 10, "worker 1 back")
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        for _ in range(10):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(path))
                s.sendall(b"unix")
                assert s.recv(4) == b"unix"
        server.stop()
    assert not path.exists()
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_tls_workers(tmp_path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    with workers(tmp_path, "--port",
                 f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1") as server:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        for _ in range(4):
            with context.wrap_socket(connect(server.port)) as s:
                s.sendall(b"secret")
                assert s.recv(6) == b"secret"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate missing (Debian package systemd)")
def test_socket_activation_and_readiness(tmp_path) -> None:
    """The parent adopts the socket systemd passed, shares it with its
    workers, and says READY=1 once both accept, with the worker count."""
    port = freePort()
    receiver = NotifyReceiver(str(tmp_path / "notify"))
    argv = [shutil.which("systemd-socket-activate"), "-l", f"127.0.0.1:{port}",
            "--fdname=echoplug", "-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH",
            *twistdCommand(), "-n", "--pidfile=", "echoplug",
            "--port", "systemd:domain=INET:name=echoplug", "--workers", "2"]
    server = startProcess(argv, tmp_path, receiver.env)
    try:
        server.waitFor(rf"Listening on 127\.0\.0\.1:{port}")
        assert echoHalfClose(port, [b"activated"]) == b"activated"
        ready = receiver.waitFor("READY=1", timeout=30)
        # Sent once both workers accept: the status says so.
        assert "STATUS=workers: 2/2 up; connections:" in ready
        server.waitFor(ALL)
        # Held open together, so the fair share spreads them (one after
        # another, any one worker may take them all).
        held = []
        for _ in range(20):
            held.append(connect(port))
            time.sleep(0.02)  # one accept per wake-up, not one burst for one worker
        try:
            for s in held:
                assert halfCloseOn(s, [b"shared"]) == b"shared"
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while (len(re.findall(r"worker=\d\] close", server.output())) < 21
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert {int(n) for n in re.findall(r"worker=(\d)\] close", server.output())} == {1, 2}
        assert server.stop() in (0, -signal.SIGTERM)
    finally:
        server.stop()
        receiver.close()
    assert sum("READY=1" in m.splitlines() for m in receiver.messages) == 1
    assert "Traceback" not in server.output()


def test_worker_tag_in_text_and_json() -> None:
    """Every event of a worker carries its number: in the text line's
    brackets (on ClassicText's fast path, byte for byte Twisted's), and as
    a JSON field."""
    import io
    import json

    from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText

    from echoplug.logs import ClassicText, JSONLinesObserver, LogLine
    from echoplug.worker import WorkerTag

    events: list[dict] = []
    out = io.StringIO()
    json_ = JSONLinesObserver(out)
    tag = WorkerTag(lambda e: (events.append(e), json_(e)), 3)  # type: ignore[arg-type]
    LogLine(Logger(namespace="echoplug", observer=tag), LogLevel.info,
            "close {peer}")(peer="127.0.0.1:5")
    text = ClassicText()(events[0])
    assert text == formatEventAsClassicLogText(events[0], formatTime=ClassicText().formatTime)
    assert "[echoplug#info worker=3] close 127.0.0.1:5" in text
    assert json.loads(out.getvalue())["worker"] == 3


@pytest.mark.slow
def test_proxy_protocol_in_every_worker(tmp_path) -> None:
    with workers(tmp_path, "--proxy-protocol", "required") as server:
        for i in range(10):
            with connect(server.port) as s:
                s.sendall(b"PROXY TCP4 192.0.2.%d 127.0.0.1 5555 10000\r\nhello" % (i + 1))
                s.shutdown(socket.SHUT_WR)
                assert s.recv(16) == b"hello"
        for i in range(10):
            server.waitFor(rf"worker=\d\] close 192\.0\.2\.{i + 1}:5555 via ")


@pytest.mark.slow
def test_udp_workers_echo_byte_exact(tmp_path) -> None:
    """--workers 2 --port udp:P: the parent binds the UDP socket, both workers
    serve it (65535-byte reads), and --metrics sums their UDP counters."""
    port = procs.freePort(socket.SOCK_DGRAM)
    with workers(tmp_path, "--port", f"udp:{port}", "--metrics", "tcp:0:interface=127.0.0.1",
                 "--udp-rate", "1000") as server:
        assert server.output().count(f"listening on 127.0.0.1:{port}") >= 2
        payloads = [bytes(range(256)) * 200, b"x", bytes(range(256)) * 255]  # 65,280
        for n in range(8):  # several source ports, so either worker may answer
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(10)
                for data in payloads:
                    s.sendto(data + bytes([n]), ("127.0.0.1", port))
                    assert s.recv(1 << 17) == data + bytes([n])
        total = 8 * len(payloads)
        waitUntil(lambda: scrape(server).get("echoplug_udp_datagrams_sent_total") == total,
                  5, "the UDP counters summed")
        values = scrape(server)
        assert values["echoplug_udp_sent_bytes_total"] == sum(
            8 * (len(d) + 1) for d in payloads)
