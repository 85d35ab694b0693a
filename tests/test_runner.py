"""
The runner: medians and percentiles, the select cap, idle connections, a
point that fails without failing the sweep, the progress bar, and the check
that the lab agrees with reality: its CPU per message for a server matches
what an independent blocking-socket client measures on the same server.
"""

from __future__ import annotations

import io
import math
import os
import socket
import time
from pathlib import Path

import pytest

from echoplug.lab import idle, procs, runner, servers
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
    # The spread: min, max and (with 3 runs) the 95% interval of the median.
    assert (row.value("msgs_per_s_min"), row.value("msgs_per_s_max")) == (100, 300)
    assert row.value("cpu_us_per_msg_lo") == pytest.approx(10.0)
    assert row.value("cpu_us_per_msg_hi") == pytest.approx(30.0)
    assert [s["cpu_us_per_msg"] for s in row.samples] == pytest.approx([30.0, 10.0, 20.0])


def test_summarize_takes_the_median_rss() -> None:
    """Each run's RSS goes to results.json as rss_kib; the row has their median."""
    samples = [Sample(messages=1000, msgsPerS=100, cpuSeconds=0.01, rttUs=[100],
                      rssBytes=kib * 1024) for kib in (30_000, 10_000, 20_000, 90_000, 40_000)]
    assert samples[0].figures()["rss_kib"] == 30_000
    row = runner.summarize(Target("echoplug", "epoll"), Point("load", 1, 15000, 64), samples)
    assert row.rss_kib == 30_000
    assert [s["rss_kib"] for s in row.samples] == [30_000, 10_000, 20_000, 90_000, 40_000]
    assert "rss_kib" in runner.COLUMNS and row.asDict()["rss_kib"] == 30_000
    # Runs without an RSS (a Sample made without one): NaN, not a crash.
    unread = [Sample(messages=1000, msgsPerS=100, cpuSeconds=0.01, rttUs=[100])]
    assert math.isnan(unread[0].figures()["rss_kib"])
    assert math.isnan(runner.summarize(Target("echoplug", "epoll"), Point("load", 1, 0, 64),
                                       unread).rss_kib)


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


def serverFds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.mark.slow
def test_idle_connections_are_accepted_and_held(tmp_path) -> None:
    """From several source addresses in turn, each echoed once, held until closed."""
    server = servers.start("echoplug", "poll", tmp_path)
    try:
        held = idle.openIdle(server.port, 120, sources=("127.0.0.2", "127.0.0.3"))
        try:
            assert len(held) == 120
            assert {s.getsockname()[0] for s in held} == {"127.0.0.2", "127.0.0.3"}
            assert serverFds(server.pid) >= 120  # the server holds every one
        finally:
            idle.closeAll(held)
    finally:
        server.stop()


@pytest.mark.slow
def test_idle_helpers_hold_their_shares(tmp_path, monkeypatch) -> None:
    """Past PER_HELPER connections, more helper processes, none in the bench."""
    monkeypatch.setattr(idle, "PER_HELPER", 50)
    assert idle.shares(120) == [50, 50, 20]
    server = servers.start("echoplug", "epoll", tmp_path)
    try:
        mine = serverFds(os.getpid())
        held = idle.Held(server.port, 120, timeout=10)
        try:
            assert len(held.procs) == 3 and all(p.poll() is None for p in held.procs)
            assert serverFds(server.pid) >= 120
            assert serverFds(os.getpid()) <= mine + 6  # only the helpers' pipes
        finally:
            held.close()
        assert [p.returncode for p in held.procs] == [0, 0, 0]
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
    assert "0/6 runs, 0/3 points, 00:15 left" in progress.text()  # from the first guess
    progress.run()
    progress.run()
    progress.point()
    assert "[########                ] 2/6 runs, 1/3 points" in out.getvalue()
    assert out.getvalue().endswith("left\n")  # not a terminal: one line per point
    progress.finish()


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
        idle.closeAll(socks)
        server.stop()
    labUs = lab[0] * 1e6 / lab[1]
    independentUs = independent[0] * 1e6 / procs.TICKS / independent[1]
    assert labUs == pytest.approx(independentUs, rel=0.4), (labUs, independentUs)


def test_row_knows_its_state() -> None:
    row = Row("echoplug", "select", "load", 1, 1000, 64, status=CAPPED)
    assert row.capped and not row.ok
    assert set(row.asDict()) == set(runner.COLUMNS)
    assert {"cpu_us_per_msg_min", "cpu_us_per_msg_max", "cpu_us_per_msg_lo",
            "cpu_us_per_msg_hi", "others_pct", "wakeups_per_msg"} <= set(runner.COLUMNS)
    assert row.key == ("echoplug", "select", "load", 1, 1000, 64)
