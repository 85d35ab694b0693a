# -*- test-case-name: tests.test_runner -*-
"""
The sweep: for each point, start the servers, hold the idle connections,
and measure each server in turn, several times, interleaved.

What keeps a figure honest here:

  - the load comes from other processes (L{echoplug.lab.load}), never from the
    process being measured or from the runner;
  - each load process warms up before the window opens; the runner reads
    the server's CPU time (utime + stime) when it tells them C{go} and again
    once all of them have drained their messages in flight, and divides by
    the messages they completed in between;
  - within a point the servers take turns (echoplug, or each of its
    variants, then its peers, then the next reactor, and round again
    C{repeat} times), so that a burst of noise from the rest of the machine
    lands on all of them, and each figure is the median of its repeats;
  - idle connections are real: opened by helper processes from several
    loopback source addresses (L{echoplug.lab.idle}), each one echoed once
    (so the server has accepted and registered it), then held open and
    silent for the whole point;
  - each figure comes with its spread over the repeats (L{stats.spread}),
    and each run with what the rest of the machine did meanwhile
    (L{Reading}: other processes' CPU, the server's wake-ups);
  - the server's RSS (its process tree's, as its CPU time) is read right
    after each window, idle connections held; a row has the median of its
    runs;
  - a server that cannot run a point is reported and skipped, never fatal:
    C{select} with more than 960 connections is "capped" (Python's
    C{select()} refuses descriptors at or above FD_SETSIZE, 1024, Twisted's
    select reactor then silently drops connections, and echoplug refuses
    connections past 960 under select), and any other failure is an
    "error: ..." row.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echoplug.lab import conditions, idle, procs, servers, stats
from echoplug.lab.servers import Server, ServerError
from echoplug.service import FD_HEADROOM, FD_SETSIZE, raiseNoFile

# Connections (idle + active) past which select is capped: where echoplug
# caps itself under -r select, FD_SETSIZE less the descriptors it keeps for
# the process itself (stdio, listening port, log, the reactor's waker).
SELECT_LIMIT = FD_SETSIZE - FD_HEADROOM


class MeasureError(Exception):
    """One measurement failed; the message is one line."""


@dataclass(frozen=True)
class Point:
    """One point of the sweep."""

    workload: str  # "load", "churn" or "udp"
    connections: int  # active connections or sockets (load, udp) or parallel loops (churn)
    idle: int
    size: int


@dataclass(frozen=True)
class Target:
    """
    One server under test: a kind (echoplug or a peer) and a reactor, and
    for one of several variants of echoplug, its server arguments (else the
    sweep's, L{Settings.serverArgs}).
    """

    kind: str
    reactor: str
    args: tuple[str, ...] | None = None
    #: echoplug's --workers, when a sweep compares worker counts (else None).
    workers: int | None = None

    @property
    def server(self) -> str:
        """
        The server column: C{echoplug}, C{echoplug[ARGS]} for a variant, and
        C{-wN} after it when the sweep compares worker counts.
        """
        name = self.kind if self.args is None else f"{self.kind}[{shlex.join(self.args)}]"
        return name if self.workers is None else f"{name}-w{self.workers}"

    @property
    def name(self) -> str:
        return servers.label(self.server, self.reactor)

    def serverArgs(self, settings: Settings) -> Sequence[str]:
        args = settings.serverArgs if self.args is None else self.args
        if self.workers is not None and self.workers > 1:
            args = [*args, "--workers", str(self.workers)]
        return args


@dataclass
class Settings:
    duration: float = 2.0
    warmup: float = 0.5
    repeat: int = 3
    clients: int = 1  # load processes
    load: str = "twisted"  # the load client: "twisted" (echoplug.lab.load) or "c" (cload.c)
    clientReactor: str = "epoll"  # the twisted load client's reactor
    serverArgs: Sequence[str] = ("--log-level", "warn")
    logDir: Path = Path("bench-out/logs")
    timeout: float = 30.0  # seconds of slack for each step beyond its planned time


@dataclass
class Sample:
    """One measured window of one server."""

    messages: int  # completed since "go", drained ones included
    msgsPerS: float
    cpuSeconds: float
    rttUs: list[int]
    #: The server's wake-ups: its poller calls (L{servers.Server.wakeups}),
    #: 0 where they are not counted.
    wakeups: int = 0
    #: Other processes' CPU during the window, in cores (L{conditions.Window}).
    othersCores: float = math.nan
    seconds: float = math.nan  # the window's wall time, as the runner saw it
    #: The server's RSS right after the window, summed over its process
    #: tree (L{servers.Server.rssBytes}).
    rssBytes: float = math.nan

    @property
    def cpuUsPerMsg(self) -> float:
        return self.cpuSeconds * 1e6 / self.messages if self.messages else math.nan

    def figures(self) -> dict[str, float]:
        """This run's figures by column name: what results.json keeps of it."""
        ranked = sorted(self.rttUs)
        return {
            "msgs_per_s": self.msgsPerS,
            "cpu_us_per_msg": self.cpuUsPerMsg,
            "p50_us": percentile(ranked, 50),
            "p99_us": percentile(ranked, 99),
            "p999_us": percentile(ranked, 99.9),
            "messages": self.messages,
            "cpu_s": self.cpuSeconds,
            "wakeups": self.wakeups,
            "cpu_us_per_wakeup": (self.cpuSeconds * 1e6 / self.wakeups if self.wakeups
                                  else math.nan),
            "others_cores": self.othersCores,
            "seconds": self.seconds,
            "rss_kib": self.rssBytes / 1024,
        }


#: The figures of a row, each the median of its runs, with its spread.
FIGURES = ["msgs_per_s", "cpu_us_per_msg", "p50_us", "p99_us", "p999_us"]
#: Per figure: min and max of the runs, and the 95% interval of the median.
SPREAD = ("min", "max", "lo", "hi")
COLUMNS = ["server", "reactor", "workload", "connections", "idle", "size",
           *[c for f in FIGURES for c in (f, *(f"{f}_{k}" for k in SPREAD))],
           "rss_kib", "wakeups_per_msg", "others_pct", "runs", "status"]


@dataclass
class Row:
    """
    A line of results.csv: the medians of one server's repeats at a point,
    their spread (L{SPREAD}, in C{spread} by column name), and every run's
    figures (C{samples}, for results.json and C{compare}).
    """

    server: str
    reactor: str
    workload: str
    connections: int
    idle: int
    size: int
    msgs_per_s: float = math.nan
    cpu_us_per_msg: float = math.nan
    p50_us: float = math.nan
    p99_us: float = math.nan
    p999_us: float = math.nan
    runs: int = 0
    status: str = "ok"
    spread: dict[str, float] = field(default_factory=dict)
    wakeups_per_msg: float = math.nan
    others_pct: float = math.nan  # other processes' CPU, % of a core, median of the runs
    samples: list[dict[str, float]] = field(default_factory=list)
    rss_kib: float = math.nan  # the server's RSS after the window, median of the runs

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def capped(self) -> bool:
        return self.status.startswith("capped")

    @property
    def key(self) -> tuple[str, str, str, int, int, int]:
        """What names a row across sweeps: the server and the point."""
        return (self.server, self.reactor, self.workload, self.connections, self.idle,
                self.size)

    def value(self, column: str) -> Any:
        if column in self.spread:
            return self.spread[column]
        return getattr(self, column, math.nan)

    def asDict(self) -> dict[str, Any]:
        return {c: self.value(c) for c in COLUMNS}


def percentile(sorted_: Sequence[int], q: float) -> float:
    """The nearest-rank percentile C{q} (0 to 100) of sorted samples."""
    if not sorted_:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_) / 100 - 1e-9))  # 99.9% of 1000 is 999
    return float(sorted_[min(rank, len(sorted_)) - 1])


def summarize(target: Target, point: Point, samples: list[Sample]) -> Row:
    """The median of each figure over the repeats, and its spread (L{stats.spread})."""
    row = Row(target.server, target.reactor, point.workload, point.connections, point.idle,
              point.size, runs=len(samples))
    if not samples:
        return row
    row.samples = [s.figures() for s in samples]
    for figure in FIGURES:
        spread = stats.spread([s[figure] for s in row.samples])
        setattr(row, figure, spread.median)
        row.spread.update({f"{figure}_{k}": getattr(spread, k) for k in SPREAD})
    if all(s.wakeups for s in samples):
        row.wakeups_per_msg = statistics.median(s.wakeups / s.messages for s in samples)
    others = [s.othersCores for s in samples if not math.isnan(s.othersCores)]
    if others:
        row.others_pct = 100 * statistics.median(others)
    rss = [s["rss_kib"] for s in row.samples if not math.isnan(s["rss_kib"])]
    if rss:
        row.rss_kib = statistics.median(rss)
    return row


def transport(point: Point) -> str:
    """What the servers serve at C{point}: C{udp} for the udp workload, else C{tcp}."""
    return "udp" if point.workload == "udp" else "tcp"


def isCapped(target: Target, point: Point) -> bool:
    """Would this server need select() past FD_SETSIZE at this point?"""
    return (target.reactor == "select" and target.kind not in servers.STANDALONE
            and point.idle + point.connections > SELECT_LIMIT)


CAPPED = (f"capped: select() cannot watch descriptors >= FD_SETSIZE ({FD_SETSIZE}); "
          f"at most {SELECT_LIMIT} connections")


def raiseFileLimit() -> int:
    """
    Raise the soft RLIMIT_NOFILE as echoplug raises its own (children
    inherit it); return the soft limit.
    """
    return raiseNoFile(None)


class LoadProcess:
    """
    One load process, C{python -m echoplug.lab.load --sync} or the C client
    (C{cload --sync}, the same protocol), and its output lines.
    """

    def __init__(self, port: int, workload: str, connections: int, size: int,
                 settings: Settings, seed: int) -> None:
        if settings.load == "c":
            from echoplug.lab import cbuild

            argv = [str(cbuild.build())]
        else:
            argv = [sys.executable, "-m", "echoplug.lab.load", "--reactor", settings.clientReactor]
        argv += ["--sync", "--port", str(port),
                 "--workload", workload, "--connections", str(connections),
                 "--size", str(size), "--duration", repr(settings.duration),
                 "--warmup", repr(settings.warmup), "--seed", str(seed)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=procs.childEnv(),
                                     start_new_session=True)
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._drainStderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")  # EOF

    def _drainStderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def next(self, deadline: float) -> bytes:
        """The next line of output; C{MeasureError} on EOF or past C{deadline}."""
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise MeasureError("the load client did not answer in time") from None
        if not line:
            self.proc.wait()
            err = self.stderr.decode(errors="replace").strip().splitlines()
            raise MeasureError(f"the load client exited with status {self.proc.returncode}"
                               + (f": {err[-1]}" if err else ""))
        return line

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(word.encode() + b"\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        self.say("quit")
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def split(total: int, parts: int) -> list[int]:
    """C{total} spread over C{parts} as evenly as whole numbers go."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


def measure(server: Server, point: Point, settings: Settings) -> Sample:
    """
    Drive C{server} at C{point} for one window and return what it cost.

    @raise MeasureError: the load client failed (a mismatch, a cut or
        refused connection, a timeout) or the server died.
    """
    shares = split(point.connections, settings.clients)
    loads = [LoadProcess(server.port, point.workload, n, point.size, settings, seed=862 + i)
             for i, n in enumerate(shares)]
    try:
        deadline = time.monotonic() + settings.warmup + settings.timeout + point.connections / 50
        for load in loads:
            line = load.next(deadline)
            if line.strip() != b"ready":
                raise MeasureError(clientError(line))
        before = Reading.take(server, loads)
        for load in loads:
            load.say("go")
        deadline = time.monotonic() + settings.duration + settings.timeout
        results = [json.loads(load.next(deadline)) for load in loads]
        after = Reading.take(server, loads)
        rss = server.rssBytes()
    finally:
        for load in loads:
            load.close()
    for r in results:
        if r.get("error"):
            raise MeasureError(f"load client: {r['error']}")
    if not server.alive():
        raise MeasureError(f"{server.name} died: {server.lastWords()}")
    messages = sum(r["messages"] for r in results)
    if messages == 0:
        raise MeasureError("no message came back in the window")
    window = after.since(before)
    return Sample(
        messages=messages,
        msgsPerS=sum(r["inWindow"] / r["seconds"] for r in results),
        cpuSeconds=after.server - before.server,
        rttUs=[us for r in results for us in r["rttUs"]],
        wakeups=after.wakeups - before.wakeups,
        othersCores=window.othersCores,
        seconds=window.seconds,
        rssBytes=rss,
    )


@dataclass(frozen=True)
class Reading:
    """
    What the runner reads at each end of a window: the server's CPU time and
    wake-ups, the load clients' and its own CPU time, and the machine's.
    """

    at: float
    server: float
    wakeups: int
    ours: float  # the load clients and the bench
    machine: conditions.CpuTimes

    @classmethod
    def take(cls, server: Server, loads: Sequence[LoadProcess]) -> Reading:
        clients = 0.0
        for load in loads:
            with contextlib.suppress(OSError):  # one that exited costs nothing more
                clients += procs.cpuSeconds(load.proc.pid)
        return cls(time.monotonic(), server.cpuSeconds(), server.wakeups(),
                   clients + conditions.ownCpu(), conditions.CpuTimes.read())

    def since(self, before: Reading) -> conditions.Window:
        ours = (self.server - before.server) + (self.ours - before.ours)
        return conditions.Window(self.at - before.at, self.machine.busy - before.machine.busy,
                                 ours)


def clientError(line: bytes) -> str:
    try:
        why = json.loads(line).get("error")
    except (ValueError, AttributeError):
        why = None
    return f"load client: {why or line.decode(errors='replace').strip()[:200]}"


class Progress:
    """
    The progress bar on stderr, drawn by tqdm: runs done of those planned,
    points done, and the time left, estimated from the runs so far (before
    the first, from C{perRun}). On a terminal it redraws one line; in a log
    it writes a line per point.
    """

    FORMAT = "echoplug-bench [{bar:24}] {n_fmt}/{total_fmt} runs{postfix}, {remaining} left"

    def __init__(self, points: int, runs: int, perRun: float, stream: Any = None) -> None:
        from tqdm import tqdm

        self.points, self.runs, self.perRun = points, runs, perRun
        self.stream = sys.stderr if stream is None else stream
        self.pointsDone = self.runsDone = 0
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=runs, file=self.stream, bar_format=self.FORMAT, ascii=" #",
                        disable=not self.tty, dynamic_ncols=True, leave=True)
        self.bar.set_postfix_str(self.where(), refresh=False)

    def where(self) -> str:
        return f"{self.pointsDone}/{self.points} points"

    def run(self, n: int = 1) -> None:
        self.runsDone += n
        if self.tty:
            self.bar.update(n)

    def point(self) -> None:
        self.pointsDone += 1
        self.draw()

    def rate(self) -> float:
        """Runs per second so far, or the first guess."""
        elapsed = time.monotonic() - self.started
        return self.runsDone / elapsed if self.runsDone and elapsed > 0 else 1 / self.perRun

    def left(self) -> float:
        return max(0, self.runs - self.runsDone) / self.rate()

    def text(self) -> str:
        from tqdm import tqdm

        return str(tqdm.format_meter(self.runsDone, self.runs, time.monotonic() - self.started,
                                 bar_format=self.FORMAT, ascii=" #", rate=self.rate(),
                                 postfix=self.where()))

    def draw(self) -> None:
        if self.tty:
            self.bar.set_postfix_str(self.where())
        else:
            self.stream.write(self.text() + "\n")
            self.stream.flush()

    def finish(self) -> None:
        self.bar.close()


def plan(points: Sequence[Point], targets: Sequence[Target], repeat: int) -> int:
    """The number of measurements a sweep will make."""
    return sum(repeat for p in points for t in targets if not isCapped(t, p))


def runPoint(point: Point, targets: Sequence[Target], settings: Settings,
             onRun: Callable[[], None] = lambda: None) -> list[Row]:
    """Measure every target at C{point}; a row for each, whatever happens."""
    failures: dict[Target, str] = {}
    samples: dict[Target, list[Sample]] = {t: [] for t in targets}
    runnable = [t for t in targets if not isCapped(t, point)]
    with contextlib.ExitStack() as stack:
        running: dict[Target, Server] = {}
        spawned = []
        for t in runnable:
            try:
                s = servers.spawn(t.kind, t.reactor, settings.logDir, t.serverArgs(settings),
                                  transport(point))
            except OSError as e:
                failures[t] = f"cannot start {t.name}: {e.strerror or e}"
                continue
            except ServerError as e:
                failures[t] = str(e)
                continue
            stack.callback(s.stop)
            spawned.append((t, s))
        for t, s in spawned:
            try:
                try:
                    servers.waitReady(s, settings.timeout)
                except ServerError:
                    if "in use" not in s.lastWords():
                        raise
                    s = servers.start(t.kind, t.reactor, settings.logDir, t.serverArgs(settings),
                                      settings.timeout, transport=transport(point))
                    stack.callback(s.stop)
                running[t] = s
            except ServerError as e:
                failures[t] = str(e)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        needed = point.idle + point.connections + FD_HEADROOM
        for t, s in running.items():
            if hard != resource.RLIM_INFINITY and needed > hard:
                failures[t] = (f"{needed} descriptors needed in the server, the hard "
                               f"RLIMIT_NOFILE is {hard}")
                continue
            if not point.idle:
                continue
            try:
                stack.callback(idle.Held(s.port, point.idle, settings.timeout).close)
            except OSError as e:
                failures[t] = f"idle connections: {e.strerror or e}"
        for _ in range(settings.repeat):
            for t in runnable:
                if t not in failures:
                    try:
                        samples[t].append(measure(running[t], point, settings))
                    except (MeasureError, ServerError) as e:
                        failures[t] = str(e)
                    except Exception as e:  # one point's surprise must not end the sweep
                        failures[t] = f"{type(e).__name__}: {e}"
                onRun()
    rows = []
    for t in targets:
        row = summarize(t, point, samples[t])
        if isCapped(t, point):
            row.status = CAPPED
        elif t in failures:
            row.status = "error: " + failures[t].replace("\n", " ")
        rows.append(row)
    return rows


def sweep(points: Sequence[Point], targets: Sequence[Target], settings: Settings,
          progress: Progress | None = None,
          onPoint: Callable[[list[Row]], None] = lambda rows: None) -> list[Row]:
    """Run every point; C{onPoint} sees each point's rows as they come."""
    raiseFileLimit()
    rows: list[Row] = []
    for point in points:
        pointRows = runPoint(point, targets, settings,
                             progress.run if progress else lambda: None)
        rows.extend(pointRows)
        onPoint(pointRows)
        if progress:
            progress.point()
    if progress:
        progress.finish()
    return rows
