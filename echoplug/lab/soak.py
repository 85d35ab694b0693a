# -*- test-case-name: tests.test_soak -*-
"""
echoplug-soak: run C{twistd echoplug} under each reactor and drive it with
many clients for a set time, to find what short tests miss: a byte lost or
reordered once in a million, or memory that creeps up connection after
connection.

Each client opens a connection, echoes a few payloads of random size (sent in
random chunks while it reads), then either half-closes and expects EOF with
nothing more, or just closes; and starts again. The server's RSS is sampled
from C{/proc} as it runs. The report gives mismatches (must be 0) and the RSS
over time (must stay flat). The load runs on stdlib asyncio, so the client
is not the code under test.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import IO

from echoplug.lab import procs

REACTORS = ("select", "poll", "epoll", "asyncio")
MiB = 1 << 20


@dataclass
class Result:
    """What one soak run saw."""

    reactor: str
    seconds: float = 0.0
    connections: int = 0
    halfCloses: int = 0
    bytesEchoed: int = 0
    mismatches: int = 0
    errors: int = 0
    tracebacks: int = 0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)

    def rssGrowth(self) -> int:
        """
        Median RSS of the last third of the run minus that of the second
        third (the first third is warm-up: allocator pools fill there).
        """
        values = [r for _, r in self.rss]
        if len(values) < 3:
            return 0
        third = len(values) // 3
        return int(statistics.median(values[-third:]) - statistics.median(values[third:2 * third]))


def rssOf(pid: int) -> int:
    """The server's RSS, or 0 if it has none (it exited meanwhile)."""
    try:
        return procs.rssBytes(pid)
    except (OSError, ValueError):
        return 0


async def client(port: int, rng: random.Random, maxSize: int, until: float,
                 result: Result) -> None:
    """One client: connection after connection until C{until}."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            result.errors += 1
            await asyncio.sleep(0.05)
            continue
        result.connections += 1
        try:
            for _ in range(rng.randint(1, 4)):
                # Sizes spread over orders of magnitude: 1 byte to maxSize.
                size = int(min(maxSize, 2 ** rng.uniform(0, maxSize.bit_length())))
                payload = rng.randbytes(max(1, size))

                async def send(payload: bytes = payload,
                               writer: asyncio.StreamWriter = writer) -> None:
                    view = memoryview(payload)
                    while view:
                        cut = rng.randint(1, min(len(view), 65536))
                        writer.write(view[:cut])
                        view = view[cut:]
                        await writer.drain()

                _, back = await asyncio.gather(send(), reader.readexactly(len(payload)))
                if back != payload:
                    result.mismatches += 1
                result.bytesEchoed += len(payload)
                if loop.time() >= until:
                    break
            if rng.random() < 0.5:
                writer.write_eof()  # half-close: the server must finish, then EOF
                if await reader.read() != b"":
                    result.mismatches += 1  # bytes nobody sent
                result.halfCloses += 1
        except asyncio.IncompleteReadError:
            result.mismatches += 1  # EOF before the whole echo
        except OSError:
            result.errors += 1
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def drive(port: int, pid: int, clients: int, seconds: float, maxSize: int,
                sample: float, seed: int, result: Result) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    until = start + seconds

    async def sampler() -> None:
        while loop.time() < until:
            result.rss.append((loop.time() - start, rssOf(pid)))
            await asyncio.sleep(sample)

    tasks = [client(port, random.Random(seed + i), maxSize, until, result)
             for i in range(clients)]
    await asyncio.gather(sampler(), *tasks)
    result.seconds = loop.time() - start


def soakOne(reactor: str, seconds: float, clients: int, maxSize: int, sample: float,
            seed: int) -> Result:
    """Start C{twistd -r reactor echoplug}, soak it, stop it."""
    result = Result(reactor)
    port = procs.freePort()
    argv = [*procs.twistdArgv(), "-r", reactor, "-n", "--pidfile=", "echoplug",
            "--port", f"tcp:{port}:interface=127.0.0.1", "--log-level", "warn",
            "--drain-timeout", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=procs.childEnv(), start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Traceback" in line:
                result.tracebacks += 1

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        try:
            listening = procs.waitForPort(port, 15, lambda: proc.poll() is None)
        except TimeoutError:
            raise SystemExit(f"echoplug-soak: twistd -r {reactor} never listened") from None
        if not listening:
            raise SystemExit(f"echoplug-soak: twistd -r {reactor} exited at start-up")
        asyncio.run(drive(port, proc.pid, clients, seconds, maxSize, sample, seed, result))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)
    return result


def report(results: list[Result], out: IO[str] = sys.stdout) -> None:
    print(f"{'reactor':8} {'secs':>5} {'conns':>7} {'halfcl':>6} {'MiB':>8} {'mismatch':>8} "
          f"{'errors':>6} {'tb':>3} {'RSS MiB first/max/last':>23} {'growth':>7}", file=out)
    for r in results:
        values = [v for _, v in r.rss] or [0]
        rss = f"{values[0] / MiB:.1f}/{max(values) / MiB:.1f}/{values[-1] / MiB:.1f}"
        print(f"{r.reactor:8} {r.seconds:5.1f} {r.connections:7} {r.halfCloses:6} "
              f"{r.bytesEchoed / MiB:8.1f} {r.mismatches:8} {r.errors:6} {r.tracebacks:3} "
              f"{rss:>23} {r.rssGrowth() / MiB:+7.2f}", file=out)
    for r in results:
        points = " ".join(f"{t:.1f}s:{v / MiB:.1f}" for t, v in r.rss)
        print(f"RSS {r.reactor}: {points}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="echoplug-soak",
        description="Soak twistd echoplug under each reactor; report mismatches and RSS.")
    parser.add_argument("--reactors", default=",".join(REACTORS),
                        help="comma-separated twistd reactor names [%(default)s]")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long to soak each reactor [%(default)s]")
    parser.add_argument("--clients", type=int, default=50,
                        help="concurrent clients [%(default)s]")
    parser.add_argument("--max-size", type=int, default=1 << 20,
                        help="largest payload in bytes [%(default)s]")
    parser.add_argument("--sample", type=float, default=1.0,
                        help="seconds between RSS samples [%(default)s]")
    parser.add_argument("--max-growth-mib", type=float, default=16.0,
                        help="fail if RSS grows more than this over the run [%(default)s]")
    parser.add_argument("--seed", type=int, default=862, help="random seed [%(default)s]")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 24 * 3600 or not 1 <= args.clients <= 5000:
        parser.error("--seconds must be in (0, 86400] and --clients in [1, 5000]")
    if args.max_size < 1 or args.sample <= 0:
        parser.error("--max-size must be 1 or more and --sample above 0")
    results = [soakOne(r.strip(), args.seconds, args.clients, args.max_size, args.sample,
                       args.seed)
               for r in args.reactors.split(",") if r.strip()]
    report(results)
    bad = [r.reactor for r in results
           if r.mismatches or r.tracebacks or r.rssGrowth() > args.max_growth_mib * MiB]
    if bad:
        print(f"echoplug-soak: FAILED on {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
