"""
The lab's output from known rows: the CSV columns, the markdown tables (one
per workload and size, capped rows shown as capped) and the PNG plots.
"""

from __future__ import annotations

import csv

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
    assert f"| echoplug | select | 10 | 1000 |  |  |  |  |  | 0 | {CAPPED} |" in text
    assert "error: load client: echo mismatch" in text


def test_churn_is_per_connection() -> None:
    text = report.markdown([Row("echoplug", "epoll", "churn", 4, 0, 64, 2000.0, 150.0,
                                1000.0, 3000.0, 5000.0, 3)])
    assert "CPU µs/conn" in text and "conn/s" in text


@pytest.mark.slow
def test_plots_are_pngs(tmp_path) -> None:
    made = report.plot(rows(), tmp_path)
    assert sorted(p.name for p in made) == ["cpu_vs_idle.png", "latency_vs_connections.png"]
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
