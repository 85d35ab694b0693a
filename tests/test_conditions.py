"""
The conditions of a sweep: the machine's facts, /proc/stat readings, other
processes' share of a window, and the warning when the machine was busy.
"""

from __future__ import annotations

import pytest

from echoplug.lab import conditions


def test_machine_names_what_the_figures_depend_on() -> None:
    facts = conditions.started("c (cload)")
    for key in ("cpu", "nproc", "kernel", "python", "twisted", "echoplug", "commit",
                "load_client", "loadavg_before"):
        assert key in facts
    assert facts["nproc"] >= 1 and facts["kernel"].startswith("Linux")
    assert facts["load_client"] == "c (cload)"
    assert len(facts["loadavg_before"]) == 3


def test_cpu_times_move_forward() -> None:
    before = conditions.CpuTimes.read()
    end = sum(range(200_000))  # some CPU time
    after = conditions.CpuTimes.read()
    assert end and after.total >= before.total and after.busy >= before.busy
    assert 0 <= before.steal <= before.total


def test_others_are_the_machine_less_ours() -> None:
    assert conditions.Window(2.0, busy=1.5, ours=1.1).othersCores == pytest.approx(0.2)
    assert conditions.Window(2.0, busy=1.0, ours=1.2).othersCores == 0.0  # ticks round


def test_a_busy_machine_is_a_warning() -> None:
    cpu = conditions.CpuTimes(busy=0, steal=0, total=0)
    later = conditions.CpuTimes(busy=10, steal=1, total=100)
    quiet = conditions.summary({"cpu": "x"}, cpu, later, [0.01, 0.03, 0.02])
    assert quiet["quiet"] and conditions.warning(quiet) is None
    assert quiet["steal_pct"] == 1.0
    busy = conditions.summary({"cpu": "x"}, cpu, later, [0.05, 0.4, 0.3])
    assert not busy["quiet"] and busy["noisy_windows"] == 2
    text = conditions.warning(busy)
    assert text is not None and "not quiet" in text and "25% of a core" in text
    assert ("other processes, cores (worst window)", "0.4") in conditions.lines(busy)


def test_git_commit_outside_a_checkout(tmp_path) -> None:
    assert conditions.gitCommit(tmp_path) is None
