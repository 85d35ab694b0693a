"""
C{echoplug-bench} end to end: one-line errors for bad options, and tiny real
sweeps (one reactor, one point, half a second) that write the CSV, the
markdown, the plots and a progress bar; a capped point and the peers.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from echoplug.lab import bench, cbuild, servers
from echoplug.lab.runner import CAPPED, Target
from tests.support import testEnv


def runBench(*args: str, cwd, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "echoplug.lab.bench", *args], cwd=cwd,
                          capture_output=True, text=True, env=testEnv(), timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def readCsv(path) -> list[dict[str, str]]:
    with path.open() as f:  # the conditions come first, as "# name: value" lines
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@pytest.mark.parametrize(("args", "why"), [
    (["--reactors", "nosuch"], "no such reactor: 'nosuch'"),
    (["--client-reactor", "nosuch"], "no such reactor: 'nosuch'"),
    (["--idle", "a,b"], "--idle: 'a,b'"),
    (["--connections", "0"], "--connections: '0'"),
    (["--duration", "0"], "--duration: '0' is not a positive number"),
    (["--repeat", "-1"], "--repeat"),
    (["--peer", "nginx"], "invalid choice: 'nginx'"),
    (["--workload", "flood"], "invalid choice: 'flood'"),
    (["--server-args", "'unclosed"], "--server-args: No closing quotation"),
    (["--no-echoplug"], "nothing to measure"),
    (["--replot", "--out", "nowhere"], "cannot read nowhere/results.csv"),
    (["--dead", "0,x"], "--dead: '0,x'"),
    (["--workload", "udp", "--load", "twisted"], "only the C load client sends datagrams"),
    (["--workload", "udp", "--idle", "0,10"], "a UDP server has no idle connections"),
    (["--workload", "udp", "--peer", "wire-echo"], "wire-echo is TCP only"),
    (["--workload", "udp", "--peer", "trio", "--peer", "node"], "trio, node is TCP only"),
    (["--workload", "udp", "--dead", "0,100"], "no idle connections (no --dead)"),
])
def test_bad_options_are_one_line(args, why, tmp_path) -> None:
    done = runBench(*args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("echoplug-bench: ")
    assert why in lines[0]


def test_no_compiler(tmp_path, monkeypatch) -> None:
    """--load c without cc is one line; unasked, the bench falls back to twisted."""
    noCC = {"CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "echoplug.lab.bench", "--load", "c"], cwd=tmp_path,
                          capture_output=True, text=True, env=testEnv(noCC), timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("echoplug-bench: no C compiler (cc, or $CC)")
    assert done.stderr.count("\n") == 1
    for name, value in noCC.items():
        monkeypatch.setenv(name, value)
    assert bench.parseArgs([]).load == "twisted"
    monkeypatch.delenv("CC")
    if cbuild.compiler() is not None:
        assert bench.parseArgs([]).load == "c"


@pytest.mark.slow
@pytest.mark.parametrize("load", ["c", "twisted"])
def test_tiny_sweep(tmp_path, load: str) -> None:
    done = runBench("--reactors", "epoll", "--connections", "2", "--idle", "0", "--size", "64",
                    "--duration", "0.5", "--warmup", "0.2", "--repeat", "1", "--load", load,
                    "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    [row] = readCsv(out / "results.csv")
    assert (row["server"], row["reactor"], row["connections"], row["idle"], row["size"]) == (
        "echoplug", "epoll", "2", "0", "64")
    assert row["status"] == "ok", row
    for column in ("msgs_per_s", "cpu_us_per_msg", "p50_us", "p99_us", "p999_us"):
        assert float(row[column]) > 0
    assert float(row["p50_us"]) <= float(row["p99_us"]) <= float(row["p999_us"])
    assert "| echoplug | epoll | 2 | 0 |" in (out / "results.md").read_text()
    assert "| echoplug | epoll | 2 | 0 |" in done.stdout
    for png in ("cpu_vs_idle.png", "latency_vs_connections.png", "summary.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "1/1 runs, 1/1 points" in done.stderr  # the progress bar
    assert f"echoplug-bench: load client {load} (" in done.stderr
    assert list((out / "logs").iterdir())  # the server's output, kept
    for png in out.glob("*.png"):
        png.unlink()
    again = runBench("--replot", "--out", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (out / "cpu_vs_idle.png").exists()
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"  # redrawn from the CSV
    assert "echoplug-bench --reactors epoll" in (out / "results.md").read_text()
    assert f"--load {load}" in (out / "results.md").read_text()


@pytest.mark.slow
def test_capped_point_never_crashes(tmp_path) -> None:
    done = runBench("--reactors", "select", "--connections", "1", "--idle", "1000",
                    "--size", "64", "--repeat", "1", "--no-plots", "--out", "out",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [row] = readCsv(tmp_path / "out" / "results.csv")
    assert row["status"] == CAPPED
    assert "capped" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_peers_and_churn_side_by_side(tmp_path) -> None:
    done = runBench("--workload", "churn", "--reactors", "poll", "--peer", "wire-echo",
                    "--peer", "asyncio", "--connections", "2", "--clients", "2",
                    "--duration", "0.5", "--warmup", "0.1", "--repeat", "1", "--no-plots",
                    "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = readCsv(tmp_path / "out" / "results.csv")
    assert [(r["server"], r["reactor"]) for r in rows] == [
        ("echoplug", "poll"), ("wire-echo", "poll"), ("asyncio", "stdlib")]
    assert all(r["status"] == "ok" and r["workload"] == "churn" for r in rows), rows
    assert "CPU µs/conn" in (tmp_path / "out" / "results.md").read_text()
    # The load client was not named: the one chosen is recorded with the figures.
    assert "--load c" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_server_args_variants_measured_in_turns(tmp_path) -> None:
    """Two --server-args: two echoplugs at the same point, one row each, named by args."""
    done = runBench("--workload", "churn", "--reactors", "epoll", "--server-args", "",
                    "--server-args", "--log-level warn", "--connections", "2", "--clients", "2",
                    "--duration", "0.4", "--warmup", "0.1", "--repeat", "2", "--out", "out",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    rows = readCsv(out / "results.csv")
    assert [(r["server"], r["reactor"], r["runs"]) for r in rows] == [
        ("echoplug[]", "epoll", "2"), ("echoplug[--log-level warn]", "epoll", "2")]
    assert all(r["status"] == "ok" for r in rows), rows
    assert "| echoplug[--log-level warn] | epoll |" in (out / "results.md").read_text()
    # Each variant ran with its own arguments: only the default one logged
    # an access line per connection.
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")}
    assert sum("bytes received" in text for text in logs.values()) == 1, list(logs)
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_server_args_variants_are_targets() -> None:
    options = bench.parseArgs(["--reactors", "poll,epoll", "--server-args", "",
                               "--server-args", "--log-level warn", "--server-args", "",
                               "--peer", "asyncio", "--load", "twisted"])
    assert options.variants == [[], ["--log-level", "warn"]]
    assert options.server_args == []
    warn = ("--log-level", "warn")
    assert bench.targets(options) == [
        Target("echoplug", "poll", ()), Target("echoplug", "poll", warn),
        Target("echoplug", "epoll", ()), Target("echoplug", "epoll", warn),
        Target("asyncio", "stdlib")]
    assert [t.name for t in bench.targets(options)[:2]] == [
        "echoplug[]/poll", "echoplug[--log-level warn]/poll"]
    # One value: today's single echoplug, named plainly.
    one = bench.parseArgs(["--server-args", "--log-level error", "--load", "twisted"])
    assert bench.targets(one)[0] == Target("echoplug", "select")
    assert one.server_args == ["--log-level", "error"]


def test_targets_put_echoplug_beside_its_peers() -> None:
    options = bench.parseArgs(["--reactors", "select,epoll", "--peer", "asyncio",
                               "--peer", "wire-echo"])
    assert bench.targets(options) == [
        Target("echoplug", "select"), Target("wire-echo", "select"),
        Target("echoplug", "epoll"), Target("wire-echo", "epoll"),
        Target("asyncio", "stdlib")]


def test_peers_run_once_not_per_reactor() -> None:
    options = bench.parseArgs(["--reactors", "poll,epoll", "--peer", "c-epoll",
                               "--peer", "asyncio", "--load", "twisted"])
    assert bench.targets(options) == [
        Target("echoplug", "poll"), Target("echoplug", "epoll"),
        Target("c-epoll", "C"), Target("asyncio", "stdlib")]
    assert servers.label("c-epoll", "C") == "c-epoll (C)"


def test_defaults_follow_the_workload() -> None:
    load = bench.parseArgs([])
    assert (load.connections, load.idle, load.size) == ([1, 10, 100], [0, 100, 1000],
                                                        [64, 1024, 16384])
    assert load.server_args == ["--log-level", "warn"]
    churn = bench.parseArgs(["--workload", "churn", "--server-args", ""])
    assert (churn.connections, churn.idle, churn.size, churn.clients) == ([4], [0], [64], 4)
    assert churn.server_args == []


@pytest.mark.slow
def test_c_epoll_peer_end_to_end(tmp_path) -> None:
    from echoplug.lab import cbuild

    if cbuild.compiler() is None:
        pytest.skip("no C compiler (cc)")
    done = runBench("--no-echoplug", "--peer", "c-epoll", "--connections", "3", "--idle", "0",
                    "--size", "512", "--duration", "0.4", "--warmup", "0.1", "--repeat", "1",
                    "--no-plots", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [row] = readCsv(tmp_path / "out" / "results.csv")
    assert (row["server"], row["reactor"], row["status"]) == ("c-epoll", "C", "ok")
    assert float(row["msgs_per_s"]) > 0


def test_a_peer_not_installed_is_skipped_with_a_reason(monkeypatch, capsys) -> None:
    monkeypatch.setitem(servers.OPTIONAL, "gevent", "no_such_module_for_echoplug")
    options = bench.parseArgs(["--peer", "gevent", "--peer", "asyncio", "--load", "twisted"])
    assert options.peer == ["asyncio"]
    assert capsys.readouterr().err == (
        "echoplug-bench: skipping --peer gevent: no_such_module_for_echoplug is not installed "
        "(pip install no_such_module_for_echoplug)\n")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert servers.missing("node") == "node is not on the PATH"


def test_the_dead_connection_curve_adds_points() -> None:
    options = bench.parseArgs(["--connections", "1,10", "--idle", "0", "--size", "64,1024",
                               "--dead", "0,2000,5000", "--load", "twisted"])
    assert [(p.connections, p.idle, p.size) for p in bench.points(options)] == [
        (1, 0, 64), (10, 0, 64), (1, 0, 1024), (10, 0, 1024), (1, 2000, 64), (1, 5000, 64)]


@pytest.mark.slow
def test_tiny_sweep_records_spread_conditions_and_compares(tmp_path) -> None:
    """
    Three runs of two servers: the spread columns, the conditions in the CSV,
    markdown and JSON, every run in the JSON, and the sweep compared with
    itself (identical sets: within noise) and with itself scaled past its
    own spread (slower).
    """
    done = runBench("--reactors", "epoll", "--peer", "asyncio", "--connections", "2",
                    "--idle", "0", "--dead", "0,40", "--size", "64", "--duration", "0.3",
                    "--warmup", "0.1", "--repeat", "3", "--no-plots", "--out", "out",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    rows = readCsv(out / "results.csv")
    assert [(r["server"], r["connections"], r["idle"]) for r in rows] == [
        ("echoplug", "2", "0"), ("asyncio", "2", "0"), ("echoplug", "1", "0"),
        ("asyncio", "1", "0"), ("echoplug", "1", "40"), ("asyncio", "1", "40")]
    for r in rows:
        assert r["status"] == "ok", r
        for figure in ("msgs_per_s", "cpu_us_per_msg", "p50_us"):
            low, high = float(r[f"{figure}_min"]), float(r[f"{figure}_max"])
            lo, hi = float(r[f"{figure}_lo"]), float(r[f"{figure}_hi"])
            assert low <= lo <= float(r[figure]) <= hi <= high, (figure, r)
        assert float(r["others_pct"]) >= 0
        if cbuild.compiler() is not None:
            assert float(r["wakeups_per_msg"]) > 0  # the poller calls were counted
    head = (out / "results.csv").read_text()
    for name in ("# CPU: ", "# nproc: ", "# kernel: Linux", "# Python: ", "# Twisted: ",
                 "# echoplug: ", "# git commit: ", "# load client: ", "# load average before: ",
                 "# load average after: ", "# steal time, % of CPU time: "):
        assert name in head
    text = (out / "results.md").read_text()
    assert "## Conditions" in text and "| load average after |" in text
    assert "95% interval" in text and "## Dead connections" in text
    document = json.loads((out / "results.json").read_text())
    assert document["conditions"]["nproc"] >= 1
    assert document["command"].startswith("echoplug-bench --reactors epoll")
    assert [len(r["samples"]) for r in document["rows"]] == [3] * 6
    assert document["rows"][0]["samples"][0]["cpu_us_per_msg"] > 0
    same = runBench("compare", "out/results.csv", "out/results.csv", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert "0 faster, 0 slower, 6 within noise of 6" in same.stdout
    # Scale B past A's own spread: a 0.3 s run on a busy machine can vary by
    # more than twice, and then a plain doubling is rightly "within noise".
    factor = 2 * max(max(values) / min(values) for values in (
        [s["cpu_us_per_msg"] for s in row["samples"]] for row in document["rows"]))
    for row in document["rows"]:
        for sample in row["samples"]:
            sample["cpu_us_per_msg"] *= factor
    (tmp_path / "double").mkdir()
    (tmp_path / "double" / "results.json").write_text(json.dumps(document))
    double = runBench("compare", "out/results.csv", "double", cwd=tmp_path)
    assert "0 faster, 6 slower, 0 within noise of 6" in double.stdout, double.stdout


def test_workers_are_variants_of_echoplug() -> None:
    options = bench.parseArgs(["--reactors", "epoll", "--workers", "2,1", "--peer", "asyncio",
                               "--load", "twisted"])
    assert bench.targets(options) == [
        Target("echoplug", "epoll", None, 1), Target("echoplug", "epoll", None, 2),
        Target("asyncio", "stdlib")]
    one, two = bench.targets(options)[:2]
    assert (one.server, two.server) == ("echoplug-w1", "echoplug-w2")
    settings = bench.runner.Settings()
    assert list(one.serverArgs(settings)) == ["--log-level", "warn"]
    assert list(two.serverArgs(settings))[-2:] == ["--workers", "2"]
    assert runBench("--workers", "0", cwd=".").returncode == 2


@pytest.mark.slow
def test_workers_sweep(tmp_path) -> None:
    """--workers 1,2: one row each, the second echoplug a parent and two
    workers, ready only once both workers accept (READY=1)."""
    done = runBench("--reactors", "epoll", "--workers", "1,2", "--connections", "4",
                    "--idle", "0", "--size", "64", "--duration", "0.5", "--warmup", "0.2",
                    "--repeat", "1", "--no-plots", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = readCsv(tmp_path / "out" / "results.csv")
    assert [(r["server"], r["status"]) for r in rows] == [
        ("echoplug-w1", "ok"), ("echoplug-w2", "ok")], rows
    assert all(float(r["cpu_us_per_msg"]) > 0 for r in rows)


@pytest.mark.slow
def test_tiny_udp_sweep(tmp_path) -> None:
    peers = ["--peer", "asyncio"] + (["--peer", "c-epoll"] if cbuild.compiler() else [])
    done = runBench("--workload", "udp", "--reactors", "epoll", "--connections", "2",
                    "--size", "2000", "--duration", "0.5", "--warmup", "0.2", "--repeat", "1",
                    *peers, "--no-plots", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {(r["server"], r["reactor"]): r for r in readCsv(tmp_path / "out" / "results.csv")}
    assert ("echoplug", "epoll") in rows and ("asyncio", "stdlib") in rows
    for row in rows.values():
        assert (row["workload"], row["idle"], row["size"]) == ("udp", "0", "2000")
        assert row["status"] == "ok", row
        assert float(row["cpu_us_per_msg"]) > 0


def test_udp_defaults_keep_the_guards_on() -> None:
    options = bench.parseArgs(["--workload", "udp"])
    assert (options.idle, options.size) == ([0], [64, 1024])
    args = options.server_args
    assert args[args.index("--udp-rate") + 1] == "1000000000"  # on, and never reached
    assert args[args.index("--udp-rate-total") + 1] == "1000000000"
    assert "--udp-allow-low-ports" not in args
