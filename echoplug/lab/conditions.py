# -*- test-case-name: tests.test_conditions -*-
"""
What the machine was like during a sweep, recorded beside the figures: a CPU
per message means little without the CPU, the kernel, the versions, the load
client and whether the machine was quiet.

  - L{machine}: CPU model, the cores this process may run on, kernel,
    Python, Twisted and echoplug versions, the git commit (with C{+dirty}
    when the tree has changes) if echoplug runs from a checkout;
  - L{CpuTimes}: the C{cpu} line of C{/proc/stat}. Two readings give the
    machine's busy time and its steal time (what the hypervisor gave to
    other guests) in between;
  - L{Window}: one measured window's share of the machine: the busy time of
    every CPU less the server's, the load clients' and the bench's own CPU
    time is what other processes took. More than L{NOISY} of a core is a
    warning in the report.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from echoplug.lab import procs

NOISY = 0.10  # other processes' CPU, in cores, past which a run was not quiet


def cpuModel() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def gitCommit(root: Path = procs.ROOT) -> str | None:
    """The commit echoplug runs from, C{+dirty} if changed; None outside a checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def loadAverage() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(loadClient: str) -> dict[str, Any]:
    """The facts that do not change during a sweep."""
    return {
        "cpu": cpuModel(),
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "twisted": version("twisted"),
        "echoplug": version("echoplug"),
        "commit": gitCommit(),
        "load_client": loadClient,
    }


@dataclass(frozen=True)
class CpuTimes:
    """The machine-wide C{cpu} line of C{/proc/stat}, in seconds."""

    busy: float  # user, nice, system, irq, softirq (guest time is inside user)
    steal: float
    total: float  # everything, idle and iowait included

    @classmethod
    def read(cls) -> CpuTimes:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return cls(busy=(user + nice + system + irq + softirq) / procs.TICKS,
                   steal=steal / procs.TICKS,
                   total=(user + nice + system + idle + iowait + irq + softirq + steal)
                   / procs.TICKS)


def ownCpu() -> float:
    """The bench's own CPU time (its threads read the load clients' pipes)."""
    times = os.times()
    return times.user + times.system


@dataclass
class Window:
    """The machine during one measured window."""

    seconds: float
    busy: float  # CPU seconds of the whole machine
    ours: float  # of which the server, the load clients and the bench

    @property
    def othersCores(self) -> float:
        """Other processes' CPU time over the window, in cores (never below 0)."""
        return max(0.0, self.busy - self.ours) / self.seconds if self.seconds > 0 else 0.0


def summary(before: dict[str, Any], cpuBefore: CpuTimes, cpuAfter: CpuTimes,
            others: list[float]) -> dict[str, Any]:
    """
    The conditions of a finished (or interrupted) sweep: L{machine}'s facts,
    the load average before and after, the steal time, and other processes'
    CPU over the measured windows (C{others}, in cores, one per window).
    """
    total = cpuAfter.total - cpuBefore.total
    steal = cpuAfter.steal - cpuBefore.steal
    worst = max(others, default=0.0)
    mean = sum(others) / len(others) if others else 0.0
    return {
        **before,
        "loadavg_after": loadAverage(),
        "steal_s": round(steal, 2),
        "steal_pct": round(100 * steal / total, 2) if total > 0 else 0.0,
        "windows": len(others),
        "others_mean_cores": round(mean, 3),
        "others_worst_cores": round(worst, 3),
        "noisy_windows": sum(o > NOISY for o in others),
        "quiet": mean <= NOISY,
    }


def warning(conditions: dict[str, Any]) -> str | None:
    """One sentence for the report when other processes took more than L{NOISY} of a core."""
    if conditions.get("quiet", True):
        return None
    return (f"the machine was not quiet: other processes took "
            f"{100 * conditions['others_mean_cores']:.0f}% of a core on average over the "
            f"measured windows ({conditions['noisy_windows']} of {conditions['windows']} "
            f"windows above {100 * NOISY:.0f}%, the worst "
            f"{100 * conditions['others_worst_cores']:.0f}%); compare with care")


LABELS = [
    ("cpu", "CPU"), ("nproc", "nproc"), ("kernel", "kernel"), ("python", "Python"),
    ("twisted", "Twisted"), ("echoplug", "echoplug"), ("commit", "git commit"),
    ("load_client", "load client"), ("loadavg_before", "load average before"),
    ("loadavg_after", "load average after"), ("steal_pct", "steal time, % of CPU time"),
    ("others_mean_cores", "other processes, cores (mean over windows)"),
    ("others_worst_cores", "other processes, cores (worst window)"),
]


def lines(conditions: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs in a fixed order, for the markdown and the CSV header."""
    out = []
    for key, name in LABELS:
        if key in conditions:
            value = conditions[key]
            if isinstance(value, list):
                value = " ".join(str(v) for v in value)
            out.append((name, "none" if value is None else str(value)))
    return out


def started(loadClient: str) -> dict[str, Any]:
    """L{machine} and the load average now, at the start of a sweep."""
    return {**machine(loadClient), "loadavg_before": loadAverage()}
