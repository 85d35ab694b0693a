"""
The load client (C{python -m echoplug.lab.load}) against a real C{twistd
echoplug}, and against small misbehaving servers that it must catch: a
flipped byte, a stale echo, a cut connection, nothing listening.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.support import cutAfterOne, flipLastByte, misbehaving, replayFirst, testEnv, twistd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with twistd("epoll", "--log-level", "warn", cwd=tmp_path_factory.mktemp("srv")) as s:
        yield s


def load(port: int, *options: str, timeout: float = 30) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "echoplug.lab.load", "--port", str(port), "--duration", "0.3",
         "--warmup", "0.1", *options],
        capture_output=True, text=True, env=testEnv(), timeout=timeout,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.slow
def test_load_counts_and_times_every_round_trip(server) -> None:
    rc, result = load(server.port, "--connections", "3", "--size", "1000")
    assert rc == 0
    assert result["error"] is None
    assert result["workload"] == "load"
    assert result["messages"] >= result["inWindow"] > 0
    assert len(result["rttUs"]) == result["inWindow"]
    assert min(result["rttUs"]) >= 0
    assert result["seconds"] >= 0.3


@pytest.mark.slow
def test_churn_counts_connections(server) -> None:
    rc, result = load(server.port, "--workload", "churn", "--connections", "2")
    assert rc == 0, result
    assert result["error"] is None
    assert result["messages"] >= result["inWindow"] > 0


@pytest.mark.slow
def test_sync_waits_for_go_and_holds_the_sockets_until_quit(server) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "echoplug.lab.load", "--sync", "--port", str(server.port),
         "--connections", "4", "--size", "100000", "--duration", "0.3", "--warmup", "0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=testEnv(),
    )
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        # 100 kB messages: a long result line, written through the
        # non-blocking stdout that StandardIO sets up.
        result = json.loads(proc.stdout.readline())
        assert result["error"] is None and result["inWindow"] > 0
        assert proc.poll() is None  # still holding its connections
        proc.stdin.write(b"quit\n")
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("handle", "why"), [
    (flipLastByte, "echo mismatch"),
    (replayFirst, "echo mismatch"),
    (cutAfterOne, "connection lost"),
])
def test_a_wrong_echo_fails_the_run(handle, why) -> None:
    with misbehaving(handle) as port:
        rc, result = load(port, "--size", "64")
    assert rc == 1
    assert why in result["error"]


def test_nothing_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        rc, result = load(port)
    assert rc == 1
    assert "cannot connect" in result["error"]
