"""
The lab's C load client (echoplug/lab/cload.c, built by echoplug.lab.cbuild):
built once and cached, the same protocol as echoplug.lab.load, and every byte
checked, against real servers on loopback.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from echoplug.lab import cbuild
from tests.support import (
    cutAfterOne,
    flipLastByte,
    freePort,
    misbehaving,
    plainEcho,
    replayFirst,
    twistd,
)

pytestmark = pytest.mark.skipif(cbuild.compiler() is None, reason="no C compiler (cc)")


@pytest.fixture(scope="module")
def cload() -> Path:
    return cbuild.build()


def run(cload: Path, *args: str, timeout: float = 30) -> tuple[int, dict, str]:
    done = subprocess.run([str(cload), *args], capture_output=True, text=True,
                          timeout=timeout)
    result = json.loads(done.stdout.splitlines()[-1]) if done.stdout.strip() else {}
    return done.returncode, result, done.stderr


def test_build_is_cached(cload: Path) -> None:
    assert cload.stat().st_mode & 0o100
    mtime = cload.stat().st_mtime_ns
    assert cbuild.build() == cload
    assert cload.stat().st_mtime_ns == mtime


def test_no_compiler_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(cbuild.BuildError, match="no C compiler") as e:
        cbuild.build()
    assert "\n" not in str(e.value)


def test_an_edited_source_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    """The cache is keyed by the source: an edit builds anew, a broken one is one line."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "src"
    source.mkdir()
    monkeypatch.setattr(cbuild, "HERE", source)
    (source / "cload.c").write_text("int main(void) { return 0; }\n")
    first = cbuild.build()
    (source / "cload.c").write_text("int main(void) { return 3; }\n")
    second = cbuild.build()
    assert first != second and first.parent == second.parent == tmp_path / "cache" / "echoplug"
    assert subprocess.run([str(second)]).returncode == 3
    (source / "cload.c").write_text("int main(void) { return nope; }\n")
    with pytest.raises(cbuild.BuildError, match="cannot build the C load client") as e:
        cbuild.build()
    assert "\n" not in str(e.value)
    # No half-written binary or temporary file is left behind.
    assert sorted(p.name for p in second.parent.iterdir()) == sorted([first.name, second.name])


@pytest.mark.slow
@pytest.mark.parametrize("reactor", ["epoll", "select"])
def test_load_against_echoplug(cload: Path, tmp_path: Path, reactor: str) -> None:
    with twistd(reactor, "--log-level", "warn", cwd=tmp_path) as server:
        rc, result, _ = run(cload, "--port", str(server.port), "--connections", "5",
                            "--size", "3000", "--duration", "0.4", "--warmup", "0.1")
    assert rc == 0, result
    assert result["error"] is None
    assert result["workload"] == "load"
    assert result["messages"] >= result["inWindow"] > 0
    assert len(result["rttUs"]) == result["inWindow"]
    assert 0 < result["seconds"] < 5


@pytest.mark.slow
def test_churn_against_echoplug(cload: Path, tmp_path: Path) -> None:
    with twistd(None, cwd=tmp_path) as server:
        rc, result, _ = run(cload, "--port", str(server.port), "--workload", "churn",
                            "--connections", "2", "--duration", "0.3", "--warmup", "0.1")
        server.waitFor(r"close 127\.0\.0\.1:\d+ after [\d.]+s, "
                       r"64 bytes received, 64 bytes sent, closed")
    assert rc == 0, result
    assert result["workload"] == "churn"
    assert result["messages"] > 0


def flipByte5000(conn: socket.socket) -> None:
    """Echo, but flip one bit of the 5001st byte: in the middle of a message."""
    with conn:
        seen = 0
        while data := bytearray(conn.recv(65536)):
            if seen <= 5000 < seen + len(data):
                data[5000 - seen] ^= 1
            seen += len(data)
            conn.sendall(data)


def test_a_corrupted_byte_is_caught(cload: Path) -> None:
    with misbehaving(flipByte5000) as port:
        rc, result, _ = run(cload, "--port", str(port), "--size", "1024",
                            "--duration", "1", "--warmup", "0")
    assert rc == 1
    assert result["error"].startswith("echo mismatch on a 1024-byte message")


def readAndClose(conn: socket.socket) -> None:
    with conn:
        conn.recv(64)


# The misbehaving servers that echoplug.lab.load must catch, and a churned
# connection closed unanswered (churn sends one message: nothing to replay).
@pytest.mark.parametrize(("workload", "handle", "why"), [
    ("load", flipLastByte, "echo mismatch"),
    ("load", replayFirst, "echo mismatch"),  # a stale echo: the payloads rotate
    ("load", cutAfterOne, "connection lost"),
    ("churn", flipLastByte, "echo mismatch"),
    ("churn", readAndClose, "connection closed before the whole echo came back"),
])
def test_a_wrong_echo_fails_the_run(cload: Path, workload: str, handle, why: str) -> None:
    with misbehaving(handle) as port:
        rc, result, _ = run(cload, "--port", str(port), "--size", "64",
                            "--workload", workload, "--duration", "0.3", "--warmup", "0.1")
    assert rc == 1
    assert why in result["error"]


def test_same_json_as_the_python_client(cload: Path) -> None:
    """A plain loopback echo: the keys of echoplug.lab.load, every round trip counted."""
    with misbehaving(plainEcho) as port:
        rc, result, err = run(cload, "--port", str(port), "--connections", "4",
                              "--size", "700", "--duration", "0.3", "--warmup", "0.1",
                              "--reactor", "poll", "--seed", "7")
    assert (rc, err) == (0, "")
    assert set(result) == {"workload", "messages", "inWindow", "seconds", "rttUs", "error"}
    assert result["error"] is None
    assert result["messages"] >= result["inWindow"] > 0
    assert len(result["rttUs"]) == result["inWindow"]
    assert all(isinstance(us, int) and us >= 0 for us in result["rttUs"])
    assert 0.3 <= result["seconds"] < 5


@pytest.mark.slow
def test_sync_protocol(cload: Path, tmp_path: Path) -> None:
    """ready, then go, then one JSON line; the sockets stay open until quit."""
    with twistd(None, cwd=tmp_path) as server:
        proc = subprocess.Popen(
            [str(cload), "--sync", "--port", str(server.port), "--connections", "3",
             "--duration", "0.3", "--warmup", "0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "ready\n"
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            assert result["error"] is None and result["messages"] > 0
            # Held open: the server has logged no close yet.
            assert "bytes received" not in server.output()
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            assert proc.wait(10) == 0
            server.waitFor("bytes received")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_refused_and_bad_options(cload: Path) -> None:
    rc, result, _ = run(cload, "--port", str(freePort()), "--duration", "0.2")
    assert rc == 1
    assert result["error"].startswith("cannot connect")
    for args in (["--port", "0"], ["--port", "1", "--workload", "flood"],
                 ["--port", "1", "--size", "0"], ["--nope", "1"]):
        rc, _, err = run(cload, *args)
        assert rc == 2
        assert err.startswith("cload: ") and err.count("\n") == 1


def test_sync_stdin_closed_before_go(cload: Path) -> None:
    """The runner gone before 'go': an error line and status 1, not a hang."""
    with misbehaving(plainEcho) as port:
        done = subprocess.run([str(cload), "--sync", "--port", str(port), "--warmup", "0.1",
                               "--duration", "0.2"], input="", capture_output=True, text=True,
                              timeout=30)
    assert done.returncode == 1
    *_, last = done.stdout.splitlines()
    assert json.loads(last)["error"] == "stdin closed before 'go'"


# The udp workload.


@contextlib.contextmanager
def datagramServer(answer):
    """A UDP server on loopback that sends back C{answer(n, data)} (or nothing)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        n = 0
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(1 << 16)
            except OSError:
                continue
            n += 1
            reply = answer(n, data)
            if reply is not None:
                sock.sendto(reply, addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        sock.close()


@pytest.mark.slow
def test_udp_against_echoplug(cload: Path, tmp_path: Path) -> None:
    with twistd("epoll", "--port", "udp:0", "--udp-rate", "1000000", "--udp-rate-total",
                "1000000", "--log-level", "info", cwd=tmp_path) as server:
        rc, result, err = run(cload, "--port", str(server.port), "--workload", "udp",
                              "--connections", "8", "--size", "8193", "--duration", "0.5",
                              "--warmup", "0.1")
    assert (rc, err) == (0, ""), result
    assert result["error"] is None and result["inWindow"] > 0
    assert result["resent"] == 0


def test_udp_resends_a_lost_datagram(cload: Path) -> None:
    with datagramServer(lambda n, data: None if n == 3 else data) as port:
        rc, result, _ = run(cload, "--port", str(port), "--workload", "udp",
                            "--duration", "0.6", "--warmup", "0")
    assert rc == 0, result
    assert result["resent"] == 1


@pytest.mark.parametrize(("answer", "why"), [
    (lambda n, data: data[:-1] + bytes([data[-1] ^ 1]), "echo mismatch on a 64-byte datagram"),
    (lambda n, data: data[:-1], "(63 bytes came back)"),
    (lambda n, data: data + b"!", "(65 bytes came back)"),
])
def test_udp_wrong_echo_fails_the_run(cload: Path, answer, why: str) -> None:
    with datagramServer(answer) as port:
        rc, result, _ = run(cload, "--port", str(port), "--workload", "udp",
                            "--duration", "0.3", "--warmup", "0.1")
    assert rc == 1
    assert why in result["error"]


def test_udp_nothing_listening(cload: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, result, _ = run(cload, "--port", str(port), "--workload", "udp", "--duration", "0.3",
                        "--warmup", "0")
    assert rc == 1
    assert "datagram lost: Connection refused" in result["error"]
