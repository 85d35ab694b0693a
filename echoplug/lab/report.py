# -*- test-case-name: tests.test_report -*-
"""
The lab's output: C{results.csv} (one row per server and point, each figure
with its spread), C{results.json} (the same rows with every run's figures,
and the conditions), C{results.md} (the conditions, then one table per
message size, as vmbench reports, the RSS per idle connection and the
dead-connection fits), and PNG plots with error bars: CPU against idle
connections, latency against active connections, C{summary.png} (the CPU per
message of every server at every point) and C{dead_connections.png}
(L{echoplug.lab.curve}).

The CSV begins with the conditions as C{# name: value} lines
(C{pandas.read_csv(path, comment="#")} skips them); L{readCsv} does too.

matplotlib is imported only when plots are drawn; it, numpy and scipy come
with the C{bench} extra.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoplug.lab import conditions as conditions_
from echoplug.lab import curve
from echoplug.lab.runner import COLUMNS, FD_SETSIZE, FIGURES, SELECT_LIMIT, SPREAD, Row
from echoplug.lab.servers import label

INTS = {"connections", "idle", "size", "runs"}
TEXTS = {"server", "reactor", "workload", "status"}


def writeCsv(rows: Sequence[Row], path: Path,
             conditions: dict[str, Any] | None = None) -> None:
    with path.open("w", newline="") as f:
        for name, value in conditions_.lines(conditions or {}):
            f.write(f"# {name}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(v, digits=3) for k, v in row.asDict().items()})


def rowFrom(record: dict[str, Any]) -> Row:
    """A L{Row} from a CSV record or a JSON object; absent columns are blank."""
    values: dict[str, Any] = {}
    spread: dict[str, float] = {}
    for column in COLUMNS:
        text = record.get(column)
        if column in INTS:
            values[column] = int(text if text is not None else 0)
        elif column in TEXTS:
            values[column] = str(text)
        else:
            number = math.nan if text in ("", None) else float(text)
            if column.rsplit("_", 1)[-1] in SPREAD and column.rsplit("_", 1)[0] in FIGURES:
                spread[column] = number
            else:
                values[column] = number
    return Row(**values, spread=spread,
               samples=[{k: nan(v) for k, v in s.items()} for s in record.get("samples", [])])


def nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def readCsv(path: Path) -> list[Row]:
    """The rows of a C{results.csv} written by L{writeCsv} (or before it had spreads)."""
    with path.open(newline="") as f:
        text = "".join(line for line in f if not line.startswith("#"))
    rows = []
    for record in csv.DictReader(io.StringIO(text)):
        for column in ("server", "connections", "idle", "size", "runs", "status"):
            if column not in record:
                raise KeyError(column)
        rows.append(rowFrom(record))
    return rows


def writeJson(rows: Sequence[Row], path: Path, conditions: dict[str, Any] | None = None,
              command: str | None = None) -> None:
    """Every row with every run's figures, and the conditions; NaN is null."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    document = {
        "command": command,
        "conditions": conditions or {},
        "rows": [{**{k: clean(v) for k, v in r.asDict().items()},
                  "samples": [{k: clean(v) for k, v in s.items()} for s in r.samples]}
                 for r in rows],
    }
    path.write_text(json.dumps(document, indent=1) + "\n")


def readJson(path: Path) -> tuple[list[Row], dict[str, Any], str | None]:
    """The rows, conditions and command of a C{results.json}."""
    document = json.loads(path.read_text())
    return ([rowFrom(r) for r in document["rows"]], document.get("conditions") or {},
            document.get("command"))


def fmt(value: object, digits: int = 1) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def units(workload: str) -> tuple[str, str]:
    """What one "message" is: a round trip, or for churn a whole connection."""
    return ("conn", "connections") if workload == "churn" else ("msg", "messages")


def spreadText(row: Row, figure: str, digits: int = 1) -> tuple[str, str]:
    """The 95% interval and the min-max range of a figure, as table cells."""
    lo, hi = row.value(f"{figure}_lo"), row.value(f"{figure}_hi")
    low, high = row.value(f"{figure}_min"), row.value(f"{figure}_max")
    ci = "" if math.isnan(lo) else f"{fmt(lo, digits)} to {fmt(hi, digits)}"
    span = "" if math.isnan(low) else f"{fmt(low, digits)} to {fmt(high, digits)}"
    return ci, span


def conditionsText(conditions: dict[str, Any]) -> list[str]:
    if not conditions:
        return []
    out = ["## Conditions", ""]
    warning = conditions_.warning(conditions)
    if warning:
        out += [f"> **Warning:** {warning}.", ""]
    out += ["| | |", "|---|---|"]
    out += [f"| {name} | {value} |" for name, value in conditions_.lines(conditions)]
    return [*out, ""]


def markdown(rows: Sequence[Row], title: str = "echoplug-bench results",
             command: str | None = None, conditions: dict[str, Any] | None = None) -> str:
    """
    The conditions, one table per workload and message size (each figure the
    median of its runs; CPU and rate with their 95% interval and range), the
    RSS per idle connection (L{idleMemory}) and the dead-connection fits.
    """
    out = [f"# {title}", ""]
    if command:
        out += ["```", command, "```", ""]
    out += conditionsText(conditions or {})
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.workload, row.size), []).append(row)
    for (workload, size), group in sorted(groups.items()):
        one, _ = units(workload)
        active = "loops" if workload == "churn" else "active"
        out += [f"## {workload}, {size}-byte messages", "",
                f"Medians of the runs; the 95% interval of the median (3 runs or more) and "
                f"the range of the runs beside the CPU per {one} and the rate; others: "
                f"other processes' CPU during the runs, in % of a core; RSS: the "
                "server's, after each run.", "",
                f"| server | reactor | {active} | idle | {one}/s | {one}/s range "
                f"| CPU µs/{one} | 95% interval | range "
                "| p50 µs | p99 µs | p99.9 µs | RSS MiB | others % | runs | status |",
                "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        group.sort(key=lambda r: (r.connections, r.idle, r.reactor, r.server))
        for r in group:
            _, rateSpan = spreadText(r, "msgs_per_s", 0)
            cpuCi, cpuSpan = spreadText(r, "cpu_us_per_msg")
            out.append(f"| {r.server} | {r.reactor} | {r.connections} | {r.idle} "
                       f"| {fmt(r.msgs_per_s, 0)} | {rateSpan} "
                       f"| {fmt(r.cpu_us_per_msg)} | {cpuCi} | {cpuSpan} "
                       f"| {fmt(r.p50_us, 0)} | {fmt(r.p99_us, 0)} | {fmt(r.p999_us, 0)} "
                       f"| {fmt(r.rss_kib / 1024)} | {fmt(r.others_pct, 0)} | {r.runs} "
                       f"| {r.status} |")
        out.append("")
    out += idleMemoryText(rows)
    out += curve.markdown(rows)
    return "\n".join(out)


@dataclass(frozen=True)
class IdleMemory:
    """What a server's RSS grew by per idle connection, from idle 0 to C{row.idle}."""

    row: Row  # the row at N idle connections
    base: Row  # the same server and point at idle 0

    @property
    def kibPerIdle(self) -> float:
        """(RSS at N - RSS at 0) / N, in KiB per idle connection."""
        return (self.row.rss_kib - self.base.rss_kib) / self.row.idle


def idleMemory(rows: Sequence[Row]) -> list[IdleMemory]:
    """
    For each measured row with N > 0 idle connections whose server and point
    were also measured at idle 0 (an RSS in both), its RSS per idle connection.
    """
    def point(r: Row) -> tuple[str, str, str, int, int]:
        return (r.server, r.reactor, r.workload, r.connections, r.size)

    measured = [r for r in rows if r.ok and not math.isnan(r.rss_kib)]
    bases = {point(r): r for r in measured if r.idle == 0}
    found = [IdleMemory(r, bases[point(r)]) for r in measured
             if r.idle > 0 and point(r) in bases]
    return sorted(found, key=lambda m: (m.row.workload, m.row.size, m.row.connections,
                                        m.row.server, m.row.reactor, m.row.idle))


def idleMemoryText(rows: Sequence[Row]) -> list[str]:
    """The "Memory per idle connection" table; nothing without idle 0 and N."""
    found = idleMemory(rows)
    if not found:
        return []
    out = ["## Memory per idle connection", "",
           "The server's RSS at N idle connections less its RSS at none, over N (medians of "
           "the runs); p99 of the active connections at N.", "",
           "| server | reactor | workload | active | size | idle | RSS MiB "
           "| KiB per idle conn | p99 µs |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for m in found:
        r = m.row
        out.append(f"| {r.server} | {r.reactor} | {r.workload} | {r.connections} | {r.size} "
                   f"| {r.idle} | {fmt(r.rss_kib / 1024)} | {fmt(m.kibPerIdle)} "
                   f"| {fmt(r.p99_us, 0)} |")
    return [*out, ""]


def lineStyle(server: str) -> dict[str, object]:
    if server.startswith("echoplug["):
        server = "echoplug"  # a variant of echoplug: the same line, its own colour
    return STYLES.get(server, {"linestyle": "-.", "marker": "d"})


STYLES: dict[str, dict[str, object]] = {
    "echoplug": {"linestyle": "-", "marker": "o"},
    "wire-echo": {"linestyle": "--", "marker": "s"},
    "asyncio": {"linestyle": ":", "marker": "^", "color": "gray"},
    "uvloop": {"linestyle": ":", "marker": "v", "color": "olive"},
    "c-epoll": {"linestyle": ":", "marker": "x", "color": "black"},
}


def plot(rows: Sequence[Row], outDir: Path) -> list[Path]:
    """
    Draw the PNGs; return their paths. Raises C{ImportError} without
    matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    made = []
    for workload in sorted({r.workload for r in rows}):
        these = [r for r in rows if r.workload == workload]
        prefix = "" if workload == "load" else f"{workload}_"
        one, _ = units(workload)
        path = outDir / f"{prefix}cpu_vs_idle.png"
        _grid(plt, these, path, x="idle", y={"cpu_us_per_msg": f"server CPU µs per {one}"},
              panel="connections", xlabel="idle connections",
              title=f"Server CPU per {one} against idle connections ({workload})")
        made.append(path)
        path = outDir / f"{prefix}latency_vs_connections.png"
        _grid(plt, these, path, x="connections",
              y={"p50_us": "p50 round trip µs", "p99_us": "p99 round trip µs"}, panel="idle",
              xlabel="active connections" if workload == "load" else "parallel loops",
              title=f"Round-trip latency against active connections ({workload})",
              logx=True, logy=True)
        made.append(path)
    path = outDir / "dead_connections.png"
    if curve.plot(plt, rows, path):
        made.append(path)
    return made


def summaryPlot(rows: Sequence[Row], outDir: Path) -> Path:
    """
    Draw C{summary.png} (L{summary}); return its path. Raises
    C{ImportError} without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = outDir / "summary.png"
    summary(plt, rows, path)
    return path


#: The standalone peers, drawn as a line across a summary panel.
PEERS = {"asyncio": ("stdlib asyncio", "tab:green"), "uvloop": ("uvloop", "tab:olive"),
         "c-epoll": ("C epoll echo", "black")}
REACTOR_ORDER = ("select", "poll", "epoll", "asyncio", "echoplug-select", "echoplug-poll",
                 "echoplug-epoll")


def summary(plt: Any, rows: Sequence[Row], path: Path) -> None:
    """
    The summary plot: one panel per point of the sweep (workload, active and
    idle connections, size), server CPU per message (or connection) as bars
    per reactor, one bar per Twisted server (echoplug, each of its variants,
    stock wire.Echo), and the standalone peers as lines across.
    """
    ok = [r for r in rows if r.ok]
    pointsOf = sorted({(r.workload, r.connections, r.idle, r.size) for r in ok})
    if not pointsOf:
        pointsOf = sorted({(r.workload, r.connections, r.idle, r.size) for r in rows})[:1]
    ncols = min(2, max(1, len(pointsOf)))
    nrows = max(1, math.ceil(len(pointsOf) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows + 0.8),
                             squeeze=False)
    servers = sorted({r.server for r in ok if r.server not in PEERS},
                     key=lambda s: (not s.startswith("echoplug"), s))
    cycle = ["tab:blue", "tab:cyan", "tab:purple", "tab:orange", "tab:brown", "tab:pink"]
    colors = {s: ("tab:gray" if s == "wire-echo" else cycle[i % len(cycle)])
              for i, s in enumerate(servers)}
    for index, (workload, connections, idle, size) in enumerate(pointsOf):
        ax = axes[index // ncols][index % ncols]
        rowsHere = {(r.server, r.reactor): r for r in ok
                    if (r.workload, r.connections, r.idle, r.size)
                    == (workload, connections, idle, size)}
        here = {k: r.cpu_us_per_msg for k, r in rowsHere.items()}
        reactors = sorted({reactor for server, reactor in here if server not in PEERS},
                          key=lambda r: (REACTOR_ORDER.index(r) if r in REACTOR_ORDER
                                         else len(REACTOR_ORDER), r))
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            xs = [x + (i - (len(servers) - 1) / 2) * width for x in range(len(reactors))]
            values = [here.get((server, reactor), math.nan) for reactor in reactors]
            bars = [rowsHere.get((server, reactor)) for reactor in reactors]
            ax.bar(xs, values, width, label=server, color=colors[server],
                   yerr=errorBars(bars, "cpu_us_per_msg"), capsize=2,
                   error_kw={"elinewidth": 0.8, "ecolor": "black"})
            for x, value in zip(xs, values, strict=True):
                if not math.isnan(value):
                    ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom",
                                fontsize=7)
        for (server, _), value in sorted(here.items()):
            if server in PEERS:
                name, color = PEERS[server]
                ax.axhline(value, color=color, linestyle="--", linewidth=1, label=name)
                low, high = spreadBounds(rowsHere[(server, _)], "cpu_us_per_msg")
                if not math.isnan(low):
                    ax.axhspan(low, high, color=color, alpha=0.12, linewidth=0)
        one, _ = units(workload)
        active = "loops" if workload == "churn" else "active"
        ax.set_xticks(list(range(len(reactors))))
        ax.set_xticklabels([r.replace("echoplug-", "echoplug-\n") for r in reactors],
                           fontsize=8)
        ax.set_title(f"{workload}: {connections} {active}, {idle} idle, {size} B", fontsize=10)
        ax.set_ylabel(f"server CPU µs per {one}", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    for extra in range(len(pointsOf), nrows * ncols):
        axes[extra // ncols][extra % ncols].set_visible(False)
    labels = figureLegend(fig, axes, 4)
    # Two lines: one would be cut off at the edges of a one-panel figure.
    fig.suptitle("Server CPU time (utime + stime) per message (lower is better)\n"
                 "median of runs with its 95% interval (else the range)", fontsize=10)
    rowsOfLegend = math.ceil(len(labels) / 4) if labels else 0
    fig.tight_layout(rect=(0, 0.03 + 0.04 * rowsOfLegend / nrows, 1, 0.93))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def spreadBounds(row: Row, figure: str) -> tuple[float, float]:
    """The 95% interval of a figure, else the range of its runs, else NaN."""
    for low, high in (("lo", "hi"), ("min", "max")):
        lo, hi = row.value(f"{figure}_{low}"), row.value(f"{figure}_{high}")
        if not (math.isnan(lo) or math.isnan(hi)):
            return lo, hi
    return math.nan, math.nan


def errorBars(rows: Sequence[Row | None], figure: str) -> list[list[float]]:
    """matplotlib's C{yerr} (below, above) from L{spreadBounds}; 0 where none."""
    below, above = [], []
    for row in rows:
        lo, hi = spreadBounds(row, figure) if row is not None else (math.nan, math.nan)
        value = row.value(figure) if row is not None else math.nan
        below.append(0.0 if math.isnan(lo) else max(0.0, value - lo))
        above.append(0.0 if math.isnan(hi) else max(0.0, hi - value))
    return [below, above]


def _grid(plt: Any, rows: Sequence[Row], path: Path, x: str, y: dict[str, str],
          panel: str, xlabel: str, title: str, logx: bool = False,
          logy: bool = False) -> None:
    """
    One panel per (message size, figure in C{y}) down and C{panel} value
    across; one line per server.
    """
    sizes = sorted({r.size for r in rows})
    lines = [(size, column) for size in sizes for column in y]
    panels = sorted({getattr(r, panel) for r in rows})
    fig, axes = plt.subplots(len(lines), len(panels),
                             figsize=(4.2 * len(panels) + 1, 3.4 * len(lines) + 0.8),
                             squeeze=False)
    names = sorted({(r.server, r.reactor) for r in rows},
                   key=lambda sr: (not sr[0].startswith("echoplug"), sr[0], sr[1]))
    variants = sorted({r.server for r in rows if r.server.startswith("echoplug[")})
    colors: dict[str, str] = {}
    cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
             "tab:pink", "tab:olive", "tab:cyan"]
    for reactor in sorted({r.reactor for r in rows}):
        colors[reactor] = cycle[len(colors) % len(cycle)]
    for i, (size, column) in enumerate(lines):
        for j, value in enumerate(panels):
            ax = axes[i][j]
            here = [r for r in rows if r.size == size and getattr(r, panel) == value]
            cappedSelect = False
            for server, reactor in names:
                line = sorted((r for r in here if (r.server, r.reactor) == (server, reactor)),
                              key=lambda r: getattr(r, x))
                if any(r.capped for r in line):
                    cappedSelect = True
                ok = [r for r in line if r.ok and not math.isnan(getattr(r, column))]
                if not ok:
                    continue
                style = {"color": colors[reactor], **lineStyle(server)}
                if server in variants:  # the same colour per reactor: tell them apart
                    style["marker"] = "oP*Dh"[variants.index(server) % 5]
                ax.errorbar([getattr(r, x) for r in ok], [getattr(r, column) for r in ok],
                            yerr=errorBars(ok, column), capsize=2, elinewidth=0.8,
                            label=label(server, reactor), **style)
            if cappedSelect and x == "idle":
                # Past this many idle connections select is capped.
                wall = SELECT_LIMIT - value if panel == "connections" else SELECT_LIMIT
                ax.axvline(wall, color="tab:red", linestyle=":", linewidth=1)
                ax.annotate(f"select capped past here\n(FD_SETSIZE {FD_SETSIZE})",
                            xy=(wall, 0.97), xycoords=("data", "axes fraction"),
                            xytext=(-4, 0), textcoords="offset points", ha="right",
                            va="top", fontsize=7, color="tab:red")
            if logx:
                ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.set_title(f"{size} B, {panel} = {value}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(y[column], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
    labels = figureLegend(fig, axes, 5)
    fig.suptitle(title, fontsize=11)
    rowsOfLegend = math.ceil(len(labels) / 5) if labels else 0
    fig.tight_layout(rect=(0, 0.04 + 0.03 * rowsOfLegend, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figureLegend(fig: Any, axes: Any, columns: int) -> list[str]:
    """One legend under the figure for every panel's lines; return its labels."""
    handles: list[Any] = []
    labels: list[str] = []
    for ax in (a for row in axes for a in row):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(columns, max(1, len(labels))),
               fontsize=8, frameon=False)
    return labels
