"""
What echoplug's access line costs inside a running server: two echoplug
servers under the same reactor, one with the default settings (an access line
per connection) and one with --log-level warn, measured in turns by the lab's
own runner under its churn workload (4 load processes, each a loop of
connect, echo 64 B, close), server CPU µs per connection from /proc. A sweep
of echoplug-bench runs one echoplug configuration, so this A/B is a script.

    python docs/access_line_ab.py [REACTOR] [ROUNDS]

Prints each round's figures, the medians and their difference.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from echoplug.lab import servers
from echoplug.lab.runner import Point, Settings, measure


def main(argv: list[str]) -> None:
    reactor = argv[0] if argv else "epoll"
    rounds = int(argv[1]) if len(argv) > 1 else 6
    logDir = Path(tempfile.mkdtemp(prefix="access-line-ab-"))
    settings = Settings(clients=4, load="c", logDir=logDir)
    point = Point("churn", 4, 0, 64)
    configs = {"default": [], "--log-level warn": ["--log-level", "warn"]}
    running = {name: servers.start("echoplug", reactor, logDir, args)
               for name, args in configs.items()}
    figures: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for _ in range(rounds):
            for name, server in running.items():
                figures[name].append(measure(server, point, settings).cpuUsPerMsg)
    finally:
        for server in running.values():
            server.stop()
    for name, values in figures.items():
        print(f"{name}: {[round(v) for v in values]} µs/conn, median "
              f"{statistics.median(values):.1f}")
    medians = [statistics.median(v) for v in figures.values()]
    print(f"the access line: {medians[0] - medians[1]:.1f} µs per connection")


if __name__ == "__main__":
    main(sys.argv[1:])
