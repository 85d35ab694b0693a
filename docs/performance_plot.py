"""
Draw docs/performance.png from the echoplug-bench runs recorded in
docs/performance.md: server CPU per message (load) and per connection
(churn), echoplug against stock wire.Echo per reactor, stdlib asyncio as a
line.

    python docs/performance_plot.py LOAD.csv IDLE.csv CHURN.csv CHURN_WARN.csv docs/performance.png

Each argument is a results.csv written by echoplug-bench --out DIR.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "ok"]


def cpu(table: list[dict[str, str]], server: str, reactor: str, **where: int) -> float:
    for r in table:
        if r["server"] == server and r["reactor"] == reactor and all(
                int(r[k]) == v for k, v in where.items()):
            return float(r["cpu_us_per_msg"])
    return float("nan")


PEERS = [("asyncio", "stdlib", "stdlib asyncio", "tab:green"),
         ("uvloop", "uvloop", "uvloop", "tab:olive"),
         ("c-epoll", "C", "C epoll echo", "black")]


def bars(ax, table, reactors, title, ylabel, target=None, **where) -> None:
    width = 0.38
    xs = range(len(reactors))
    mine = [cpu(table, "echoplug", r, **where) for r in reactors]
    stock = [cpu(table, "wire-echo", r, **where) for r in reactors]
    ax.bar([x - width / 2 for x in xs], mine, width, label="echoplug", color="tab:blue")
    ax.bar([x + width / 2 for x in xs], stock, width, label="stock wire.Echo",
           color="tab:gray")
    if target is not None:
        # The target for echoplug, as a dash over each echoplug bar.
        # Only on Twisted's own reactors: that is what the target is set against.
        for i, (x, value, reactor) in enumerate(zip(xs, stock, reactors, strict=True)):
            if value == value and not reactor.startswith("echoplug-"):
                ax.hlines(value * target, x - width, x, colors="tab:red",
                          label=f"target: {target:g} x stock" if i == 0 else None)
    for server, reactor, name, color in PEERS:
        value = cpu(table, server, reactor, **where)
        if value == value:
            ax.axhline(value, color=color, linestyle="--", linewidth=1, label=name)
    for x, value in zip(xs, mine, strict=True):
        if value == value:
            ax.annotate(f"{value:.1f}", (x - width / 2, value), ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.replace("echoplug-", "echoplug-\n") for r in reactors], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def main(argv: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load, idle, churn, churnWarn = (rows(p) for p in argv[:4])
    out = Path(argv[4])
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    reactors = [r for r in ("select", "poll", "epoll", "asyncio", "echoplug-select",
                            "echoplug-poll", "echoplug-epoll")
                if any(x["reactor"] == r for x in load)]
    bars(axes[0][0], load, reactors, "50 connections, 1 KiB, one in flight",
         "server CPU µs per message", target=0.65)
    churnReactors = [r for r in reactors if any(x["reactor"] == r for x in churn)]
    bars(axes[0][1], churn, churnReactors, "churn, default settings (access log on)",
         "server CPU µs per connection", target=1.25)
    bars(axes[1][1], churnWarn, churnReactors, "churn, --log-level warn",
         "server CPU µs per connection", target=1.1)
    ax = axes[1][0]
    idleReactors = sorted({x["reactor"] for x in idle if x["server"] == "echoplug"})
    width = 0.38
    for i, count in enumerate((0, 900)):
        values = [cpu(idle, "echoplug", r, connections=10, idle=count) for r in idleReactors]
        ax.bar([x + (i - 0.5) * width for x in range(len(idleReactors))], values, width,
               label=f"echoplug, 10 active + {count} idle",
               color=("tab:blue", "tab:cyan")[i])
    ax.set_xticks(list(range(len(idleReactors))))
    ax.set_xticklabels(idleReactors, fontsize=8)
    ax.set_title("10 active connections, with and without 900 idle", fontsize=10)
    ax.set_ylabel("server CPU µs per message")
    ax.legend(fontsize=7)
    for i, count in enumerate((0, 900)):
        for x, r in enumerate(idleReactors):
            value = cpu(idle, "echoplug", r, connections=10, idle=count)
            ax.annotate(f"{value:.1f}", (x + (i - 0.5) * width, value), ha="center",
                        va="bottom", fontsize=7)
    # One legend for the bar panels, below them all (the target dashes differ by panel).
    handles, labels = axes[0][0].get_legend_handles_labels()
    for panel in (axes[0][1], axes[1][1]):
        for h, label in zip(*panel.get_legend_handles_labels(), strict=True):
            if label.startswith("target") and label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("echoplug: server CPU time (utime+stime) per message, median of runs "
                 "(lower is better)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
