"""
C{echoplug-bench compare} on synthetic result sets whose answer is known:
identical sets are within noise, twice the CPU is slower, half is faster,
more messages per second is faster; rows in one set only are listed; bad
input is one line.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from echoplug.lab import compare, report
from echoplug.lab.runner import FIGURES, Row
from tests.test_bench import runBench


def resultSet(factor: dict[str, float], seed: int = 1) -> list[Row]:
    """Two servers at one point, 5 runs each with 3% noise; CPU times C{factor}."""
    rng = random.Random(seed)
    rows = []
    for server, cpu in (("echoplug", 20.0), ("wire-echo", 35.0)):
        f = factor.get(server, 1.0)
        samples = [{"cpu_us_per_msg": cpu * f * rng.uniform(0.97, 1.03),
                    "msgs_per_s": 40_000 / f * rng.uniform(0.97, 1.03),
                    "p50_us": 25.0, "p99_us": 60.0, "p999_us": 90.0} for _ in range(5)]
        row = Row(server, "epoll", "load", 10, 0, 64, runs=5, samples=samples)
        for figure in FIGURES:
            setattr(row, figure, sorted(s[figure] for s in samples)[2])
        rows.append(row)
    return rows


def save(rows: list[Row], directory: Path) -> Path:
    directory.mkdir()
    report.writeCsv(rows, directory / "results.csv")
    report.writeJson(rows, directory / "results.json")
    return directory / "results.csv"


def verdicts(a: list[Row], b: list[Row], figure: str = "cpu_us_per_msg") -> dict[str, str]:
    changes, _, _ = compare.compare(a, b, figure)
    return {c.a.server: c.verdict for c in changes}


def test_identical_sets_are_within_noise() -> None:
    same = resultSet({})
    assert verdicts(same, same) == {"echoplug": "within noise", "wire-echo": "within noise"}
    # Two sets drawn alike, with their own noise.
    assert set(verdicts(resultSet({}, 1), resultSet({}, 2)).values()) == {"within noise"}


def test_twice_the_cpu_is_slower_half_is_faster() -> None:
    base = resultSet({})
    assert verdicts(base, resultSet({"echoplug": 2.0})) == {
        "echoplug": "slower", "wire-echo": "within noise"}
    assert verdicts(base, resultSet({"wire-echo": 0.5}))["wire-echo"] == "faster"
    # Half the messages per second is slower too: higher is better there.
    assert verdicts(base, resultSet({"echoplug": 2.0}), "msgs_per_s")["echoplug"] == "slower"


def test_the_command(tmp_path) -> None:
    a = save(resultSet({}), tmp_path / "a")
    b = save([*resultSet({"echoplug": 2.0}),
              Row("c-epoll", "C", "load", 10, 0, 64, runs=1)], tmp_path / "b")
    done = runBench("compare", str(a), str(b), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| echoplug | epoll | load | 10 | 0 | 64 |" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("| echoplug |"))
    assert line.endswith("| slower |") and "| 2.0" in line
    assert "1 slower, 1 within noise of 2" in done.stdout
    assert "bootstrap" in done.stdout  # the test is stated
    assert "only in B: c-epoll/C" in done.stdout
    again = runBench("compare", str(a.parent), str(a), "--threshold", "5", cwd=tmp_path)
    assert "0 faster, 0 slower, 2 within noise of 2" in again.stdout


@pytest.mark.parametrize(("args", "why"), [
    (["nowhere/results.csv", "nowhere/results.csv"], "no nowhere/results.json"),
    (["--threshold", "x", "a", "b"], "'x' is not a percentage"),
    (["a"], "the following arguments are required: b"),
])
def test_bad_input_is_one_line(args, why, tmp_path) -> None:
    done = runBench("compare", *args, cwd=tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("echoplug-bench compare: ") and why in line
