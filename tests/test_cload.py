"""
The lab's C load client (echoplug/lab/cload.c, built by echoplug.lab.cbuild):
built once and cached, the same protocol as echoplug.load, and every byte
checked, against real servers on loopback.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from echoplug.lab import cbuild
from tests.support import freePort, twistd

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


def test_churn_against_echoplug(cload: Path, tmp_path: Path) -> None:
    with twistd(None, cwd=tmp_path) as server:
        rc, result, _ = run(cload, "--port", str(server.port), "--workload", "churn",
                            "--connections", "2", "--duration", "0.3", "--warmup", "0.1")
        server.waitFor(r"close 127\.0\.0\.1:\d+ after [\d.]+s, 64 bytes echoed, closed")
    assert rc == 0, result
    assert result["workload"] == "churn"
    assert result["messages"] > 0


@contextlib.contextmanager
def corruptingEcho(after: int) -> Iterator[int]:
    """An echo server on loopback that flips one bit of byte C{after}."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            conn.settimeout(10)
            seen = 0
            while not stop.is_set():
                data = bytearray(conn.recv(65536))
                if not data:
                    break
                if seen <= after < seen + len(data):
                    data[after - seen] ^= 1
                seen += len(data)
                conn.sendall(data)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(10)


def test_a_corrupted_byte_is_caught(cload: Path) -> None:
    with corruptingEcho(after=5000) as port:
        rc, result, _ = run(cload, "--port", str(port), "--size", "1024",
                            "--duration", "1", "--warmup", "0")
    assert rc == 1
    assert result["error"].startswith("echo mismatch on a 1024-byte message")


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
            assert "bytes echoed" not in server.output()
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            assert proc.wait(10) == 0
            server.waitFor("bytes echoed")
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
