"""
The lab's output from known rows: the CSV columns, the markdown tables (one
per workload and size, capped rows shown as capped) and the PNG plots.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from echoplug.lab import report
from echoplug.lab.runner import CAPPED, Row

REQUIRED = ["reactor", "connections", "idle", "size", "msgs_per_s", "cpu_us_per_msg",
            "p50_us", "p99_us"]


def rows() -> list[Row]:
    made = []
    for reactor, slope in [("select", 0.05), ("poll", 0.035), ("epoll", 0.0)]:
        for idle in (0, 500, 1000):
            row = Row("echoplug", reactor, "load", 10, idle, 64, msgs_per_s=9000.0,
                      cpu_us_per_msg=20 + slope * idle, p50_us=300.0, p99_us=900.0,
                      p999_us=1500.0, runs=3)
            if reactor == "select" and idle == 1000:
                row = Row("echoplug", "select", "load", 10, 1000, 64, status=CAPPED)
            made.append(row)
    made.append(Row("asyncio", "stdlib", "load", 10, 0, 64, 12000.0, 15.0, 250.0, 700.0,
                    900.0, 3))
    made.append(Row("echoplug", "poll", "load", 100, 0, 64, 15000.0, 18.0, 3000.0, 5000.0,
                    6000.0, 3))
    made.append(Row("echoplug", "poll", "load", 1, 0, 64,
                    status="error: load client: echo mismatch"))
    return made


def test_csv_has_the_columns_and_blank_for_capped(tmp_path) -> None:
    path = tmp_path / "results.csv"
    report.writeCsv(rows(), path)
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert set(REQUIRED) <= set(read[0])
    capped = [r for r in read if r["status"] == CAPPED]
    assert len(capped) == 1 and capped[0]["cpu_us_per_msg"] == ""
    assert float(read[1]["cpu_us_per_msg"]) == 20 + 0.05 * 500


def test_csv_reads_back(tmp_path) -> None:
    path = tmp_path / "results.csv"
    report.writeCsv(rows(), path)
    back = report.readCsv(path)
    assert [r.status for r in back] == [r.status for r in rows()]
    assert [round(r.cpu_us_per_msg, 3) for r in back if r.ok] == [
        round(r.cpu_us_per_msg, 3) for r in rows() if r.ok]
    assert report.markdown(back) == report.markdown(rows())


def test_markdown_one_table_per_size() -> None:
    extra = Row("echoplug", "epoll", "load", 1, 0, 1024, 1.0, 2.0, 3.0, 4.0, 5.0, 1)
    text = report.markdown([*rows(), extra], command="echoplug-bench --x")
    assert "## load, 64-byte messages" in text
    assert "## load, 1024-byte messages" in text
    assert "echoplug-bench --x" in text
    assert (f"| echoplug | select | 10 | 1000 |  |  |  |  |  |  |  |  |  |  | 0 | {CAPPED} |"
            in text)
    assert "error: load client: echo mismatch" in text


def spreadRow() -> Row:
    return Row("echoplug", "poll", "load", 10, 0, 64, 9000.0, 20.0, 300.0, 900.0, 1500.0, 3,
               spread={"msgs_per_s_min": 8000.0, "msgs_per_s_max": 9500.0,
                       "cpu_us_per_msg_min": 18.0, "cpu_us_per_msg_max": 25.0,
                       "cpu_us_per_msg_lo": 18.5, "cpu_us_per_msg_hi": 24.0},
               others_pct=3.0, rss_kib=20480.0,
               samples=[{"cpu_us_per_msg": v, "msgs_per_s": 9000.0} for v in (18, 20, 25)])


CONDITIONS = {"cpu": "AMD EPYC", "nproc": 2, "kernel": "Linux 6", "python": "3.11.7",
              "twisted": "26.10.0", "echoplug": "0.1.0", "commit": None,
              "load_client": "c (cload)", "loadavg_before": [0.5, 0.4, 0.3],
              "loadavg_after": [0.6, 0.4, 0.3], "steal_pct": 0.1, "windows": 3,
              "others_mean_cores": 0.02, "others_worst_cores": 0.04, "noisy_windows": 0,
              "quiet": True}


def test_markdown_shows_the_spread_and_the_conditions() -> None:
    text = report.markdown([spreadRow()], conditions=CONDITIONS)
    assert ("| echoplug | poll | 10 | 0 | 9000 | 8000 to 9500 | 20.0 | 18.5 to 24.0 "
            "| 18.0 to 25.0 | 300 | 900 | 1500 | 20.0 | 3 | 3 | ok |") in text
    assert "| CPU | AMD EPYC |" in text and "| load client | c (cload) |" in text
    assert "| git commit | none |" in text
    assert "Warning" not in text
    busy = {**CONDITIONS, "quiet": False, "others_mean_cores": 0.4, "noisy_windows": 2}
    assert "> **Warning:** the machine was not quiet" in report.markdown([], conditions=busy)


def test_csv_and_json_keep_spread_conditions_and_runs(tmp_path) -> None:
    report.writeCsv([spreadRow()], tmp_path / "results.csv", CONDITIONS)
    head = (tmp_path / "results.csv").read_text().splitlines()
    assert "# CPU: AMD EPYC" in head and "# load average before: 0.5 0.4 0.3" in head
    [back] = report.readCsv(tmp_path / "results.csv")
    assert back.value("cpu_us_per_msg_lo") == 18.5 and back.others_pct == 3.0
    assert back.rss_kib == 20480.0
    assert math.isnan(back.value("p50_us_lo"))
    report.writeJson([spreadRow()], tmp_path / "results.json", CONDITIONS, "echoplug-bench x")
    rows, conditions, command = report.readJson(tmp_path / "results.json")
    assert conditions == CONDITIONS and command == "echoplug-bench x"
    assert [s["cpu_us_per_msg"] for s in rows[0].samples] == [18, 20, 25]
    assert rows[0].value("cpu_us_per_msg_hi") == 24.0
    assert math.isnan(rows[0].value("p99_us_lo"))  # NaN went out as null and came back


def test_a_csv_from_before_the_spread_reads(tmp_path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("server,reactor,workload,connections,idle,size,msgs_per_s,cpu_us_per_msg,"
                    "p50_us,p99_us,p999_us,runs,status\n"
                    "echoplug,poll,load,1,0,64,100.0,20.0,30,40,50,3,ok\n")
    [row] = report.readCsv(path)
    assert row.cpu_us_per_msg == 20.0 and math.isnan(row.value("cpu_us_per_msg_min"))
    assert math.isnan(row.rss_kib)  # from before the RSS too
    assert "| echoplug | poll | 1 | 0 | 100 |" in report.markdown([row])


def test_a_json_from_before_the_rss_reads(tmp_path) -> None:
    """An old results.json: no rss_kib in its rows or runs; NaN, and no memory section."""
    old = {"command": "echoplug-bench x", "conditions": {}, "rows": [
        {"server": "echoplug", "reactor": "epoll", "workload": "load", "connections": 1,
         "idle": idle, "size": 64, "cpu_us_per_msg": 20.0, "runs": 1, "status": "ok",
         "samples": [{"cpu_us_per_msg": 20.0, "msgs_per_s": 100.0}]} for idle in (0, 100)]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    rows, _, _ = report.readJson(path)
    assert all(math.isnan(r.rss_kib) for r in rows)
    assert report.idleMemory(rows) == []
    assert "Memory per idle connection" not in report.markdown(rows)


def memoryRow(server: str, idle: int, rssKib: float, p99: float = 900.0,
              status: str = "ok") -> Row:
    reactor = "stdlib" if server == "asyncio" else "echoplug-epoll"
    return Row(server, reactor, "load", 1, idle, 64, 9000.0, 20.0, 300.0, p99, 1500.0, 3,
               status, rss_kib=rssKib)


def test_memory_per_idle_connection() -> None:
    """(RSS at N - RSS at 0) x 1024 / N bytes, in KiB, per server and N; p99 at N."""
    made = [memoryRow("echoplug", 0, 20_000.0), memoryRow("echoplug", 15000, 50_000.0, 1234.0),
            memoryRow("asyncio", 0, 10_000.0), memoryRow("asyncio", 15000, 85_000.0, 777.0),
            memoryRow("asyncio", 3000, 13_000.0),
            # not at idle 0 for this size: no base, no figure
            Row("echoplug", "echoplug-epoll", "load", 1, 15000, 1024, rss_kib=90_000.0),
            memoryRow("echoplug", 500, 99_000.0, status="error: died")]
    found = {(m.row.server, m.row.idle): m.kibPerIdle for m in report.idleMemory(made)}
    assert found == {("echoplug", 15000): pytest.approx(2.0),
                     ("asyncio", 15000): pytest.approx(5.0),
                     ("asyncio", 3000): pytest.approx(1.0)}
    text = report.markdown(made)
    assert "## Memory per idle connection" in text
    assert "| echoplug | echoplug-epoll | load | 1 | 64 | 15000 | 48.8 | 2.0 | 1234 |" in text
    assert "| asyncio | stdlib | load | 1 | 64 | 15000 | 83.0 | 5.0 | 777 |" in text
    assert "| asyncio | stdlib | load | 1 | 64 | 3000 | 12.7 | 1.0 | 900 |" in text
    # The per-point table has the RSS in MiB.
    assert "| p99.9 µs | RSS MiB |" in text
    assert "| 1500 | 19.5 | " in text
    # Idle 0 alone: no section.
    assert "Memory per idle connection" not in report.markdown(made[:1])


def test_churn_is_per_connection() -> None:
    text = report.markdown([Row("echoplug", "epoll", "churn", 4, 0, 64, 2000.0, 150.0,
                                1000.0, 3000.0, 5000.0, 3)])
    assert "CPU µs/conn" in text and "conn/s" in text


@pytest.mark.slow
def test_plots_are_pngs(tmp_path) -> None:
    made = report.plot(rows(), tmp_path)
    # Several idle counts per server: the dead-connection curve too.
    assert sorted(p.name for p in made) == ["cpu_vs_idle.png", "dead_connections.png",
                                            "latency_vs_connections.png"]
    for path in made:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_from_a_results_csv(tmp_path) -> None:
    """The summary plot is drawn from results.csv as read back, variants and peers included."""
    made = [
        *rows(),
        Row("echoplug[--log-level warn]", "poll", "load", 10, 0, 64, 9500.0, 17.0, 280.0,
            800.0, 1200.0, 3),
        Row("wire-echo", "poll", "load", 10, 0, 64, 8000.0, 30.0, 350.0, 950.0, 1400.0, 3)]
    report.writeCsv(made, tmp_path / "results.csv")
    back = report.readCsv(tmp_path / "results.csv")
    assert report.summaryPlot(back, tmp_path) == tmp_path / "summary.png"
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
