# -*- test-case-name: tests.test_compare -*-
"""
C{echoplug-bench compare A/results.csv B/results.csv}: for every server and
point in both sweeps, the ratio B/A of a figure and a verdict, as pyperf's
C{compare_to} gives one.

The test: the ratio of the medians of the runs, and a 95% percentile
bootstrap interval of it (L{stats.ratio}: each sweep's runs resampled on
their own, 10,000 times, from a fixed seed). B is slower or faster where the
interval excludes 1 and the ratio is further from 1 than C{--threshold}
(none by default); everything else is "within noise". The interval only
knows the spread of the runs within each sweep: two sweeps run minutes
apart on a shared machine also drift between them, which is what a
threshold is for (docs/experiments.md gives an A/A measurement of it).

The runs come from the C{results.json} beside each C{results.csv}.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from echoplug.lab import report, stats
from echoplug.lab.runner import FIGURES, Row

#: The default --threshold, a fraction: none, the interval alone decides.
NOISE = 0.0
LOWER_IS_BETTER = {"msgs_per_s": False}


@dataclass(frozen=True)
class Change:
    a: Row
    b: Row
    figure: str
    ratio: stats.Ratio
    verdict: str


def compare(a: Sequence[Row], b: Sequence[Row], figure: str = "cpu_us_per_msg",
            threshold: float = NOISE) -> tuple[list[Change], list[Row], list[Row]]:
    """The changes of every row measured in both, and the rows only in A and only in B."""
    before = {r.key: r for r in a if r.ok}
    after = {r.key: r for r in b if r.ok}
    changes = []
    for key, old in before.items():
        new = after.get(key)
        if new is None:
            continue
        r = stats.ratio([s[figure] for s in old.samples], [s[figure] for s in new.samples])
        changes.append(Change(old, new, figure, r,
                              r.verdict(LOWER_IS_BETTER.get(figure, True), threshold)))
    return (changes, [r for k, r in before.items() if k not in after],
            [r for k, r in after.items() if k not in before])


def text(changes: Sequence[Change], onlyA: Sequence[Row], onlyB: Sequence[Row],
         figure: str, threshold: float) -> str:
    rule = "the interval excludes 1"
    if threshold:
        rule += f" and the change exceeds {100 * threshold:g}%"
    out = [f"{figure}: B/A of the medians of the runs, with a 95% bootstrap interval of the "
           f"ratio (10,000 resamples of each side); faster or slower where {rule}", "",
           "| server | reactor | workload | active | idle | size | A | B | B/A | 95% interval "
           "| verdict |", "|---|---|---|--:|--:|--:|--:|--:|--:|---|---|"]
    for c in changes:
        r = c.a
        lo = "" if math.isnan(c.ratio.lo) else f"{c.ratio.lo:.3f} to {c.ratio.hi:.3f}"
        out.append(f"| {r.server} | {r.reactor} | {r.workload} | {r.connections} | {r.idle} "
                   f"| {r.size} | {report.fmt(c.a.value(figure), 1)} "
                   f"| {report.fmt(c.b.value(figure), 1)} | {c.ratio.ratio:.3f} | {lo} "
                   f"| {c.verdict} |")
    counts = {v: sum(c.verdict == v for c in changes) for v in ("faster", "slower",
                                                                "within noise")}
    out += ["", ", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(changes)}"]
    for name, rows in (("A", onlyA), ("B", onlyB)):
        if rows:
            out.append(f"only in {name}: " + "; ".join(
                f"{r.server}/{r.reactor} {r.connections} active {r.idle} idle {r.size} B"
                for r in rows))
    return "\n".join(out)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"echoplug-bench compare: {message} (see echoplug-bench compare --help)\n")


def load(given: Path) -> list[Row]:
    """The rows, with their runs, of a sweep named by its directory, CSV or JSON."""
    if given.is_dir():
        path = given / "results.json"
    else:
        path = given.with_suffix(".json")
    if not path.exists():
        raise ValueError(f"no {path}: compare needs every run's figures, which sweeps "
                         "write to results.json beside results.csv")
    try:
        rows, _, _ = report.readJson(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    return rows


def percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        value = -1.0
    if not 0 <= value < 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage")
    return value / 100


def main(argv: Sequence[str]) -> int:
    p = Parser(prog="echoplug-bench compare",
               description="Compare two sweeps point by point: B/A and a verdict.")
    p.add_argument("a", type=Path, help="the baseline: a results.csv (or its directory)")
    p.add_argument("b", type=Path, help="the sweep to judge against it")
    p.add_argument("--figure", choices=FIGURES, default="cpu_us_per_msg",
                   help="the figure compared [cpu_us_per_msg]")
    p.add_argument("--threshold", type=percent, default=NOISE,
                   help="the smallest change, in %%, that can be a verdict, for drift "
                   "between sweeps that the runs' spread does not show [0]")
    options = p.parse_args(argv)
    try:
        a, b = load(options.a), load(options.b)
    except ValueError as e:
        print(f"echoplug-bench compare: {e}", file=sys.stderr)
        return 2
    changes, onlyA, onlyB = compare(a, b, options.figure, options.threshold)
    if not changes:
        print("echoplug-bench compare: no server and point was measured in both",
              file=sys.stderr)
        return 1
    sys.stdout.write(text(changes, onlyA, onlyB, options.figure, options.threshold) + "\n")
    return 0
