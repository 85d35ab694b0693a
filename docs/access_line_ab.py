"""
What echoplug's access line costs inside a running server: two echoplug
servers under the same reactor, one with the default settings (an access line
per connection) and one with --log-level warn, measured in turns under the
lab's C churn client (4 loops: connect, echo 64 B, close), server CPU µs per
connection from /proc. The lab runs one echoplug configuration per sweep, so
this A/B is a script of its own.

    python docs/access_line_ab.py [REACTOR] [ROUNDS]

Prints each round's figures, the medians and their difference.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from echoplug.lab import cbuild


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpuSeconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / 100


def churnOnce(client: str, server: subprocess.Popen[bytes], port: int) -> float:
    """One 2 s window of 4 churn loops; the server's CPU µs per connection."""
    loads = [subprocess.Popen([client, "--sync", "--port", str(port), "--workload", "churn",
                               "--connections", "1", "--size", "64", "--duration", "2",
                               "--warmup", "0.3"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    for load in loads:
        assert load.stdout is not None and load.stdout.readline().strip() == "ready"
    before = cpuSeconds(server.pid)
    for load in loads:
        assert load.stdin is not None
        load.stdin.write("go\n")
        load.stdin.flush()
    results = [json.loads(load.stdout.readline()) for load in loads]  # type: ignore[union-attr]
    after = cpuSeconds(server.pid)
    for load in loads:
        load.stdin.write("quit\n")  # type: ignore[union-attr]
        load.stdin.flush()  # type: ignore[union-attr]
        load.wait(10)
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise SystemExit(f"load client: {errors[0]}")
    return (after - before) * 1e6 / sum(r["messages"] for r in results)


def main(argv: list[str]) -> None:
    reactor = argv[0] if argv else "epoll"
    rounds = int(argv[1]) if len(argv) > 1 else 6
    client = str(cbuild.build())
    configs = {"default": [], "--log-level warn": ["--log-level", "warn"]}
    servers = {}
    for name, args in configs.items():
        port = freePort()
        log = open(f"/tmp/access-line-ab-{len(servers)}.log", "wb")
        servers[name] = (subprocess.Popen(
            ["twistd", "-r", reactor, "-n", "--pidfile=", "echoplug", "--port", str(port),
             *args], stdout=log, stderr=subprocess.STDOUT, cwd="/tmp"), port)
    time.sleep(2)
    figures: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for _ in range(rounds):
            for name, (server, port) in servers.items():
                figures[name].append(churnOnce(client, server, port))
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait()
    for name, values in figures.items():
        print(f"{name}: {[round(v) for v in values]} µs/conn, median "
              f"{statistics.median(values):.1f}")
    medians = [statistics.median(v) for v in figures.values()]
    print(f"the access line: {medians[0] - medians[1]:.1f} µs per connection")


if __name__ == "__main__":
    main(sys.argv[1:])
