"""
How 200 connections from one client spread over 2 workers: held open, and
short (connect, echo 1 byte, close); three rounds each. Prints the
connections each worker accepted, from --metrics. docs/performance.md
("Workers") cites it.

    python -m tests.workers_spread [REACTOR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.support import connect
from tests.test_workers import scrape, workers


def perWorker(server) -> list[int]:
    values = scrape(server)
    return [int(values[f'echoplug_worker_connections_accepted_total{{worker="{n}"}}'])
            for n in (1, 2)]


def main(reactor: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        for mode in ("held", "short"):
            for round_ in range(3):
                with workers(Path(d), "--metrics", "tcp:0:interface=127.0.0.1",
                             reactor=reactor) as server:
                    held = []
                    for _ in range(200):
                        s = connect(server.port)
                        s.sendall(b"x")
                        s.recv(1)
                        if mode == "held":
                            held.append(s)
                        else:
                            s.close()
                    time.sleep(0.3)
                    print(mode, round_, perWorker(server), flush=True)
                    for s in held:
                        s.close()


if __name__ == "__main__":
    main(*sys.argv[1:2])
