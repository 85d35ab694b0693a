# -*- test-case-name: tests.test_curve -*-
"""
The dead-connection curve, after Davide Libenzi's epoll experiment: a fixed
load on a few active connections while more and more idle ("dead")
connections are held open, and what each idle descriptor costs.

select and poll hand the kernel every watched descriptor on every call, so
their cost per wake-up grows by a fixed amount per idle descriptor; epoll's
should not grow at all. For each server and point of the sweep that was
measured at two or more idle counts, L{fits} draws a least-squares line
through every run (L{stats.fitLine}):

  - CPU per wake-up against idle connections: the slope is the price of an
    idle descriptor on each wake-up, in ns. A wake-up is one call of the
    server's poller (C{select}, C{poll}, C{epoll_wait}...), blocking or not,
    counted in the server by C{pollcount.c} (L{echoplug.lab.servers.counted});
  - CPU per message against idle connections, in ns per idle descriptor per
    message: the same price times the wake-ups per message.

Both come with the slope's 95% interval. select stops at its wall: its
points past FD_SETSIZE are "capped" rows, so its line is fitted on fewer
idle counts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoplug.lab import stats
from echoplug.lab.runner import Row


@dataclass(frozen=True)
class CurveFit:
    server: str
    reactor: str
    workload: str
    connections: int
    size: int
    idle: tuple[int, ...]  # the idle counts fitted
    perWakeup: stats.Fit  # ns per idle descriptor per wake-up, against idle
    perMessage: stats.Fit  # ns per idle descriptor per message
    wakeupsPerMsg: float


def points(rows: Sequence[Row], figure: str) -> tuple[list[float], list[float]]:
    """(idle, figure) of every run of C{rows}; a row without runs gives its median."""
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        values = [s.get(figure, math.nan) for s in row.samples] or [row.value(figure)]
        xs += [float(row.idle)] * len(values)
        ys += [float(v) for v in values]
    return xs, ys


def groups(rows: Sequence[Row]) -> dict[tuple[str, str, str, int, int], list[Row]]:
    """The measured rows of each server and point, over two or more idle counts."""
    found: dict[tuple[str, str, str, int, int], list[Row]] = {}
    for row in rows:
        if row.ok:
            found.setdefault((row.server, row.reactor, row.workload, row.connections,
                              row.size), []).append(row)
    return {k: sorted(v, key=lambda r: r.idle) for k, v in found.items()
            if len({r.idle for r in v}) >= 2}


def scaled(fit: stats.Fit, factor: float) -> stats.Fit:
    return stats.Fit(fit.slope * factor, fit.lo * factor, fit.hi * factor,
                     fit.intercept * factor, fit.r2, fit.n)


def fits(rows: Sequence[Row]) -> list[CurveFit]:
    out = []
    for (server, reactor, workload, connections, size), these in sorted(groups(rows).items()):
        # The figures are in µs; the slopes are reported in ns.
        perWakeup = scaled(stats.fitLine(*points(these, "cpu_us_per_wakeup")), 1000)
        perMessage = scaled(stats.fitLine(*points(these, "cpu_us_per_msg")), 1000)
        ratios = [r.wakeups_per_msg for r in these if not math.isnan(r.wakeups_per_msg)]
        out.append(CurveFit(server, reactor, workload, connections, size,
                            tuple(sorted({r.idle for r in these})), perWakeup, perMessage,
                            statistics.median(ratios) if ratios else math.nan))
    return out


def interval(fit: stats.Fit, digits: int = 1) -> str:
    if math.isnan(fit.slope):
        return ""
    if math.isnan(fit.lo):
        return f"{fit.slope:.{digits}f}"
    return f"{fit.slope:.{digits}f} [{fit.lo:.{digits}f}, {fit.hi:.{digits}f}]"


def markdown(rows: Sequence[Row]) -> list[str]:
    """The fits as a table (nothing when no server was measured at two idle counts)."""
    found = fits(rows)
    if not found:
        return []
    out = ["## Dead connections: the price of an idle descriptor", "",
           "Least squares through every run, with the slope's 95% interval. A wake-up is one "
           "call of the server's poller (select, poll, epoll_wait), counted in the server.",
           "",
           "| server | reactor | workload | active | size | idle fitted "
           "| ns per idle fd per wake-up | ns per idle fd per message | wake-ups/msg | R² | runs |",
           "|---|---|---|--:|--:|---|--:|--:|--:|--:|--:|"]
    for f in found:
        idle = f"{f.idle[0]} to {f.idle[-1]} ({len(f.idle)})"
        r2 = "" if math.isnan(f.perMessage.r2) else f"{f.perMessage.r2:.2f}"
        ratio = "" if math.isnan(f.wakeupsPerMsg) else f"{f.wakeupsPerMsg:.2f}"
        out.append(f"| {f.server} | {f.reactor} | {f.workload} | {f.connections} | {f.size} "
                   f"| {idle} | {interval(f.perWakeup, 2)} | {interval(f.perMessage, 2)} "
                   f"| {ratio} | {r2} | {f.perMessage.n} |")
    out.append("")
    return out


def plot(plt: Any, rows: Sequence[Row], path: Path) -> bool:
    """
    C{dead_connections.png}: CPU per message and per wake-up against idle
    connections, every run as a dot, the fitted lines through them; one row
    of panels per point. Return False (and draw nothing) without a curve.
    """
    found = fits(rows)
    if not found:
        return False
    panels = sorted({(f.workload, f.connections, f.size) for f in found})
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4 * len(panels) + 0.8),
                             squeeze=False)
    byGroup = groups(rows)
    cycle = ["tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown",
             "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "black"]
    names = sorted({(f.server, f.reactor) for f in found})
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
    for i, (workload, connections, size) in enumerate(panels):
        for j, (figure, fitOf, ylabel) in enumerate([
                ("cpu_us_per_msg", "perMessage", "server CPU µs per message"),
                ("cpu_us_per_wakeup", "perWakeup", "server CPU µs per wake-up")]):
            ax = axes[i][j]
            for f in found:
                if (f.workload, f.connections, f.size) != (workload, connections, size):
                    continue
                these = byGroup[(f.server, f.reactor, f.workload, f.connections, f.size)]
                xs, ys = points(these, figure)
                color = colors[(f.server, f.reactor)]
                fit: stats.Fit = getattr(f, fitOf)
                name = f"{f.server}/{f.reactor}"
                if not math.isnan(fit.slope):
                    name += f": {fit.slope:.2f} ns per idle fd"
                    line = [f.idle[0], f.idle[-1]]
                    ax.plot(line, [(fit.intercept + fit.slope * x) / 1000 for x in line],
                            color=color, linewidth=1.2)
                ax.plot(xs, ys, "o", color=color, markersize=3, alpha=0.7, label=name)
            ax.set_title(f"{workload}: {connections} active, {size} B", fontsize=9)
            ax.set_xlabel("idle connections", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Dead connections: server CPU against idle connections, every run, "
                 "least-squares lines", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
