"""
The runner: medians and percentiles, the select cap, idle connections, a
point that fails without failing the sweep, the progress bar, and the check
that the lab agrees with reality: its CPU per message for a server matches
what an independent blocking-socket client measures on the same server.
"""

from __future__ import annotations

import io
import math
import socket
import time
from pathlib import Path

import pytest

from echoplug.lab import procs, runner, servers
from echoplug.lab.runner import CAPPED, Point, Row, Sample, Settings, Target


def test_percentile_is_nearest_rank() -> None:
    data = list(range(1, 1001))
    assert runner.percentile(data, 50) == 500
    assert runner.percentile(data, 99) == 990
    assert runner.percentile(data, 99.9) == 999
    assert runner.percentile([7], 99.9) == 7
    assert math.isnan(runner.percentile([], 50))


def test_summarize_takes_the_median_of_each_figure() -> None:
    samples = [Sample(messages=1000, msgsPerS=r, cpuSeconds=c, rttUs=[r] * 10)
               for r, c in [(100, 0.030), (300, 0.010), (200, 0.020)]]
    row = runner.summarize(Target("echoplug", "poll"), Point("load", 10, 0, 64), samples)
    assert (row.server, row.reactor, row.connections, row.runs) == ("echoplug", "poll", 10, 3)
    assert row.msgs_per_s == 200
    assert row.cpu_us_per_msg == pytest.approx(20.0)
    assert row.p50_us == row.p99_us == 200


def test_split_spreads_connections() -> None:
    assert runner.split(10, 3) == [4, 3, 3]
    assert runner.split(2, 4) == [1, 1]
    assert runner.split(1, 1) == [1]


@pytest.mark.parametrize(("target", "idle", "active", "capped"), [
    (Target("echoplug", "select"), 999, 1, True),
    (Target("wire-echo", "select"), 951, 10, True),
    (Target("echoplug", "select"), 950, 10, False),
    (Target("echoplug", "select"), 900, 10, False),
    (Target("echoplug", "poll"), 1000, 100, False),
    (Target("asyncio", "stdlib"), 1000, 100, False),
])
def test_select_is_capped_near_fd_setsize(target, idle, active, capped) -> None:
    assert runner.isCapped(target, Point("load", active, idle, 64)) is capped


@pytest.mark.slow
def test_idle_connections_are_accepted_and_held(tmp_path) -> None:
    server = servers.start("echoplug", "poll", tmp_path)
    try:
        held = runner.openIdle(server.port, 120)
        try:
            assert len(held) == 120
            fds = len(list(Path(f"/proc/{server.pid}/fd").iterdir()))
            assert fds >= 120  # the server holds every one
        finally:
            runner.closeAll(held)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_point_that_cannot_run_is_a_row_not_a_crash(tmp_path) -> None:
    """select past 960 connections is capped; a reactor that fails is an error row."""
    targets = [Target("echoplug", "select"), Target("echoplug", "kqueue")]
    point = Point("load", 1, 999, 64)
    rows = runner.runPoint(point, targets, Settings(repeat=2, logDir=tmp_path))
    assert [r.reactor for r in rows] == ["select", "kqueue"]
    assert rows[0].status == CAPPED and rows[0].capped
    assert rows[1].status.startswith("error: echoplug/kqueue exited")
    assert all(r.runs == 0 and math.isnan(r.cpu_us_per_msg) for r in rows)


def test_progress_shows_points_runs_and_time_left() -> None:
    out = io.StringIO()
    progress = runner.Progress(points=3, runs=6, perRun=2.5, stream=out)
    assert "0/3 points, 0/6 runs, 0m15s left" in progress.text()
    progress.run()
    progress.run()
    progress.point()
    assert "1/3 points, 2/6 runs" in out.getvalue()
    assert out.getvalue().endswith("left\n")  # not a terminal: one line per point


def serverTicks(pid: int) -> int:
    """utime + stime, read here and not through the lab's code."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def blockingLoad(socks: list[socket.socket], seconds: float) -> int:
    """Lock-step rounds: 64 bytes on every socket, then read every echo back."""
    message = bytes(range(64))
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in socks:
            s.sendall(message)
        for s in socks:
            got = b""
            while len(got) < len(message):
                chunk = s.recv(len(message) - len(got))
                assert chunk, "connection closed"
                got += chunk
            assert got == message
        count += len(socks)
    return count


@pytest.mark.slow
def test_the_lab_agrees_with_a_blocking_socket_client(tmp_path) -> None:
    """
    Same server, same point (10 connections, 64 B, no idle), measured in
    alternating rounds by the lab and by plain blocking sockets: the CPU per
    message must agree within 40%. Rounds alternate so that the noise of a
    shared machine lands on both.
    """
    server = servers.start("echoplug", "epoll", tmp_path)
    point = Point("load", 10, 0, 64)
    settings = Settings(duration=0.5, warmup=0.2, logDir=tmp_path)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
             for _ in range(point.connections)]
    try:
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lab = [0.0, 0]
        independent = [0, 0]
        blockingLoad(socks, 0.2)  # warm-up
        for _ in range(4):
            sample = runner.measure(server, point, settings)
            lab[0] += sample.cpuSeconds
            lab[1] += sample.messages
            before = serverTicks(server.pid)
            independent[1] += blockingLoad(socks, 0.5)
            independent[0] += serverTicks(server.pid) - before
    finally:
        runner.closeAll(socks)
        server.stop()
    labUs = lab[0] * 1e6 / lab[1]
    independentUs = independent[0] * 1e6 / procs.TICKS / independent[1]
    assert labUs == pytest.approx(independentUs, rel=0.4), (labUs, independentUs)


def test_row_knows_its_state() -> None:
    row = Row("echoplug", "select", "load", 1, 1000, 64, status=CAPPED)
    assert row.capped and not row.ok
    assert set(row.asDict()) == set(runner.COLUMNS)
