"""
Tests of L{echoplug.lab.soak}: a short soak of every reactor through the real
command (the long one is run by hand: C{echoplug-soak --seconds 600}).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from echoplug.lab.soak import REACTORS, Result, main
from tests.support import testEnv


def test_rss_growth_ignores_warm_up() -> None:
    r = Result("x", rss=[(0, 10), (1, 50), (2, 100), (3, 100), (4, 101), (5, 100)])
    assert r.rssGrowth() == 0  # the warm-up third does not count
    r.rss = [(0, 100), (1, 100), (2, 100), (3, 100), (4, 900), (5, 900)]
    assert r.rssGrowth() == 800


def test_bad_arguments_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--seconds", "0"])
    assert e.value.code == 2
    assert "--seconds" in capsys.readouterr().err


@pytest.mark.slow
def test_short_soak_every_reactor(tmp_path) -> None:
    """About 2 s per reactor: no mismatch, no traceback, RSS flat."""
    result = subprocess.run(
        [sys.executable, "-m", "echoplug.lab.soak", "--seconds", "2", "--clients", "16",
         "--max-size", "131072", "--sample", "0.2", "--max-growth-mib", "8"],
        cwd=tmp_path, env=testEnv(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:5]}
    assert sorted(rows) == sorted(REACTORS)
    for reactor, row in rows.items():
        conns, mismatches, errors, tracebacks = int(row[2]), int(row[5]), int(row[6]), int(row[7])
        assert conns > 10, reactor
        assert (mismatches, errors, tracebacks) == (0, 0, 0), reactor
