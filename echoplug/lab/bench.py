# -*- test-case-name: tests.test_bench -*-
"""
C{echoplug-bench}: compare Twisted reactors (and echoplug with its peers)
in one command, and get a table and a picture.

    echoplug-bench --reactors select,poll,epoll --connections 1,10,100 \\
        --idle 0,100,1000 --size 64 --peer wire-echo --peer asyncio --out bench-out
    echoplug-bench --reactors poll,epoll --dead 0,2000,5000 --out curve
    echoplug-bench compare before/results.csv after/results.csv

The pieces (servers, load client, runner, report) live in L{echoplug.lab} and
L{echoplug.lab.load}; this module is the command line. A mistake in the options
is one line on stderr and exit status 2; the sweep itself never dies of one
point: a point that cannot run is a "capped" or "error: ..." row.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from echoplug.lab import cbuild, conditions, report, runner
from echoplug.lab.runner import Point, Settings, Target
from echoplug.lab.servers import STANDALONE, missing

PEERS = ("wire-echo", "asyncio", "uvloop", "c-epoll", "gevent", "tornado", "trio", "node")
#: The peers with a UDP echo (the udp workload).
UDP_PEERS = ("asyncio", "uvloop", "c-epoll")
#: What the bench needs beyond echoplug's own dependencies: the bench extra.
NEEDS = ("numpy", "scipy", "tqdm")
DEFAULTS = {
    "load": {"connections": "1,10,100", "idle": "0,100,1000", "size": "64,1024,16384",
             "clients": 1},
    # Churn: four loops, each its own process, connect-echo-close.
    "churn": {"connections": "4", "idle": "0", "size": "64", "clients": 4},
    # UDP: each socket keeps one datagram in flight; no idle connections.
    "udp": {"connections": "1,10,100", "idle": "0", "size": "64,1024", "clients": 1},
}
SERVER_ARGS = "--log-level warn"
#: Under the udp workload: the guards stay on (each datagram is checked and
#: its source's bucket updated), with rates that no load here reaches.
UDP_SERVER_ARGS = "--log-level warn --udp-rate 1000000000 --udp-rate-total 1000000000"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block.
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def intList(minimum: int) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        values = []
        for part in text.split(","):
            part = part.strip()
            if not part.isdigit() or int(part) < minimum:
                raise argparse.ArgumentTypeError(
                    f"{text!r}: expected comma-separated whole numbers of at least {minimum}")
            values.append(int(part))
        return sorted(set(values))

    return parse


def nameList(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated reactor names")
    return list(dict.fromkeys(names))


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def nonNegative(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else positive(text)


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def knownReactors() -> list[str]:
    """Reactor names twistd accepts here, from the same reactor plugins."""
    from twisted.application.reactors import getReactorTypes

    return sorted({r.shortName for r in getReactorTypes()})


def parser() -> Parser:
    p = Parser(
        prog="echoplug-bench",
        description="Sweep reactors, active and idle connections and message sizes; measure "
        "the server's CPU per message, messages per second and round-trip latency; write "
        "results.csv, results.md and PNG plots to --out.",
    )
    p.add_argument("--reactors", type=nameList, default=["select", "poll", "epoll", "asyncio"],
                   help="twistd reactors, comma-separated [select,poll,epoll,asyncio]")
    p.add_argument("--connections", type=intList(1), default=None,
                   help="active connections (churn: parallel connect-echo-close loops) "
                   "[1,10,100; churn: 4]")
    p.add_argument("--idle", type=intList(0), default=None,
                   help="idle connections held open during a point [0,100,1000; churn: 0]")
    p.add_argument("--size", type=intList(1), default=None,
                   help="message sizes in bytes [64,1024,16384; churn: 64]")
    p.add_argument("--workload", choices=["load", "churn", "udp"], default="load",
                   help="load: each connection keeps one message in flight; churn: connect, "
                   "echo 64 B, close, measured per connection; udp: each UDP socket keeps "
                   "one datagram in flight, measured per datagram (the C load client, no "
                   "idle connections, no wire-echo; c-epoll is a recvfrom/sendto echo) [load]")
    p.add_argument("--duration", type=positive, default=2.0,
                   help="seconds measured per run [2]")
    p.add_argument("--warmup", type=nonNegative, default=0.5,
                   help="seconds of load before each run is measured [0.5]")
    p.add_argument("--repeat", type=count, default=3,
                   help="runs per server and point, interleaved; the median is reported [3]")
    p.add_argument("--peer", action="append", choices=PEERS, default=[],
                   help="also measure a peer server: wire-echo (stock twisted.protocols.wire."
                   "Echo under the same reactor), asyncio (stdlib asyncio), uvloop (the same "
                   "on uvloop), c-epoll (a plain epoll echo in C, built with cc), gevent "
                   "(StreamServer), tornado (TCPServer), trio (serve_tcp) or node (Node.js "
                   "net); repeatable; a peer not installed here is skipped with a reason")
    p.add_argument("--dead", type=intList(0), default=[],
                   help="the dead-connection curve: also measure these idle counts (for "
                   "example 0,2000,5000,10000,15000) at --dead-connections active "
                   "connections and the smallest --size; select stops at its wall")
    p.add_argument("--dead-connections", type=count, default=1,
                   help="active connections of the dead-connection curve [1]")
    p.add_argument("--no-echoplug", action="store_true",
                   help="measure the peers only")
    p.add_argument("--server-args", action="append", default=None,
                   help=f"extra options for twistd echoplug, as one string [{SERVER_ARGS!r}]; "
                   "'' for echoplug's defaults (an access-log line per connection). "
                   "Repeatable: each value is a variant of echoplug, measured in turns with "
                   "the others at every point and named echoplug[ARGS] in the results")
    p.add_argument("--workers", type=intList(1), default=None,
                   help="echoplug's --workers, comma-separated: each count is a variant of "
                   "echoplug (named echoplug-wN), measured in turns; CPU is summed over the "
                   "parent and its workers [one process, as without --workers]")
    p.add_argument("--clients", type=count, default=None,
                   help="load-client processes sharing the connections [1; churn: 4]")
    p.add_argument("--load", choices=["c", "twisted"], default=None,
                   help="the load client: c (a small epoll client in C, built with cc on "
                   "first use; fast enough to keep the server busy) or twisted "
                   "(echoplug.lab.load, in Python) [c when a C compiler is found]")
    p.add_argument("--client-reactor", default="epoll",
                   help="the twisted load client's reactor [epoll]")
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="directory for results.csv, results.md, the plots and server logs "
                   "[bench-out]")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--replot", action="store_true",
                   help="measure nothing: redraw results.md and the plots from --out's "
                   "results.json (or results.csv)")
    p.epilog = ("echoplug-bench compare A/results.csv B/results.csv compares two sweeps "
                "(see echoplug-bench compare --help)")
    return p


def parseArgs(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    options = p.parse_args(argv)
    defaults = DEFAULTS[options.workload]
    for name in ("connections", "idle", "size"):
        if getattr(options, name) is None:
            setattr(options, name, intList(0)(str(defaults[name])))
    if options.clients is None:
        options.clients = defaults["clients"]
    known = knownReactors()
    for name in [*options.reactors, options.client_reactor]:
        if name not in known:
            p.error(f"no such reactor: {name!r} (this machine has {', '.join(known)})")
    try:
        default = UDP_SERVER_ARGS if options.workload == "udp" else SERVER_ARGS
        variants = [shlex.split(a) for a in options.server_args or [default]]
    except ValueError as e:
        p.error(f"--server-args: {e}")
    # Each variant once, in the order given; the first is the sweep's own.
    options.variants = [list(v) for v in dict.fromkeys(tuple(v) for v in variants)]
    options.server_args = options.variants[0]
    options.peer = list(dict.fromkeys(options.peer))
    if options.load is None:
        options.load = "c" if cbuild.compiler() is not None else "twisted"
    if options.workload == "udp":
        if options.load != "c":
            p.error("--workload udp: only the C load client sends datagrams (--load c)")
        if options.idle != [0]:
            p.error("--workload udp: a UDP server has no idle connections (--idle 0)")
        if options.dead:
            p.error("--workload udp: a UDP server has no idle connections (no --dead)")
        tcpOnly = [k for k in options.peer if k not in UDP_PEERS]
        if tcpOnly:
            p.error(f"--workload udp: {', '.join(tcpOnly)} is TCP only")
    if not options.replot:
        # Build the C programs now: a missing compiler is one line, before any run.
        for name, wanted in (("cload", options.load == "c"),
                             ("cecho", "c-epoll" in options.peer
                              and options.workload != "udp"),
                             ("cudpecho", "c-epoll" in options.peer
                              and options.workload == "udp")):
            try:
                if wanted:
                    cbuild.build(name)
            except cbuild.BuildError as e:
                p.error(str(e))
        lacking = [m for m in NEEDS if importlib.util.find_spec(m) is None]
        if lacking:
            p.error(f"{', '.join(lacking)} not installed: pip install 'echoplug[bench]'")
        for peer in list(options.peer):
            why = missing(peer)
            if why:
                print(f"{p.prog}: skipping --peer {peer}: {why}", file=sys.stderr)
                options.peer.remove(peer)
    if options.no_echoplug and not options.peer:
        p.error("--no-echoplug leaves nothing to measure: add a --peer")
    return options


def targets(options: argparse.Namespace) -> list[Target]:
    """
    echoplug (each of its variants, if several C{--server-args} were given,
    for each C{--workers} count) and the Twisted peers per reactor; the
    standalone peers once.
    """
    variants: list[tuple[str, ...] | None] = [None]
    if len(options.variants) > 1:
        variants = [tuple(v) for v in options.variants]
    workers: list[int | None] = list(options.workers or [None])
    found = []
    for reactor in options.reactors:
        if not options.no_echoplug:
            found += [Target("echoplug", reactor, v, w) for v in variants for w in workers]
        found += [Target(k, reactor) for k in options.peer if k not in STANDALONE]
    found += [Target(k, STANDALONE[k]) for k in options.peer if k in STANDALONE]
    return found


def points(options: argparse.Namespace) -> list[Point]:
    """
    The grid (sizes, active and idle connections), then the dead-connection
    curve's points that the grid lacks.
    """
    grid = [Point(options.workload, c, i, s)
            for s in options.size for c in options.connections for i in options.idle]
    dead = [Point(options.workload, options.dead_connections, i, min(options.size))
            for i in options.dead]
    return list(dict.fromkeys(grid + dead))


def replot(out: Path) -> int:
    """Redraw the table and the plots of an earlier sweep, with its runs if it kept them."""
    source = out / "results.json"
    conditions: dict[str, object] = {}
    command = None
    try:
        if source.exists():
            rows, conditions, command = report.readJson(source)
        else:
            source = out / "results.csv"
            rows = report.readCsv(source)
    except (OSError, KeyError, ValueError, TypeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not a results file ({e})"
        print(f"echoplug-bench: cannot read {source}: {why}", file=sys.stderr)
        return 2
    commandFile = out / "command.txt"
    if command is None and commandFile.exists():
        command = commandFile.read_text().strip()
    text = report.markdown(rows, command=command, conditions=conditions)
    (out / "results.md").write_text(text)
    writePlots(rows, out)
    sys.stdout.write(text + "\n")
    return 0


def writePlots(rows: list[runner.Row], out: Path) -> None:
    try:
        made = [*report.plot(rows, out), report.summaryPlot(rows, out)]
    except ImportError:
        print("echoplug-bench: matplotlib is not installed (pip install "
              "'echoplug[bench]'), so no plots", file=sys.stderr)
    else:
        for path in made:
            print(f"echoplug-bench: wrote {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["compare"]:
        from echoplug.lab import compare

        return compare.main(given[1:])
    options = parseArgs(given)
    out: Path = options.out
    if options.replot:
        return replot(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"echoplug-bench: cannot create {out}: {e.strerror}", file=sys.stderr)
        return 2
    settings = Settings(duration=options.duration, warmup=options.warmup,
                        repeat=options.repeat, clients=options.clients,
                        load=options.load, clientReactor=options.client_reactor,
                        serverArgs=options.server_args, logDir=out / "logs")
    sweepPoints, sweepTargets = points(options), targets(options)
    progress = runner.Progress(len(sweepPoints),
                               runner.plan(sweepPoints, sweepTargets, options.repeat),
                               perRun=options.warmup + options.duration + 0.8)
    args = list(given)
    if not any(a == "--load" or a.startswith("--load=") for a in args):
        args += ["--load", options.load]  # the figures depend on it: say which
    command = "echoplug-bench " + " ".join(shlex.quote(a) for a in args)
    (out / "command.txt").write_text(command + "\n")
    rows: list[runner.Row] = []
    # Which client made the figures matters (a slow one idles the server):
    # say it up front; command.txt, results.md and results.json record it too.
    client = (f"c ({cbuild.build()})" if options.load == "c" else
              f"twisted (python -m echoplug.lab.load, reactor {options.client_reactor})")
    before = conditions.started(client)
    cpuBefore = conditions.CpuTimes.read()

    def now() -> dict[str, object]:
        others = [s["others_cores"] for r in rows for s in r.samples
                  if not math.isnan(s.get("others_cores", math.nan))]
        return conditions.summary(before, cpuBefore, conditions.CpuTimes.read(), others)

    def save(newRows: list[runner.Row]) -> None:
        # Written after every point, so an interrupted sweep keeps what it had.
        rows.extend(newRows)
        writeResults(rows, out, command, now())

    print(f"echoplug-bench: load client {client}", file=sys.stderr)
    progress.draw()
    try:
        runner.sweep(sweepPoints, sweepTargets, settings, progress, onPoint=save)
    except KeyboardInterrupt:
        progress.finish()
        print(f"echoplug-bench: interrupted; {len(rows)} rows in {out / 'results.csv'}",
              file=sys.stderr)
        return 130
    if not options.no_plots and rows:
        writePlots(rows, out)
    final = now()
    writeResults(rows, out, command, final)
    warning = conditions.warning(final)
    if warning:
        print(f"echoplug-bench: warning: {warning}", file=sys.stderr)
    failed = [r for r in rows if r.status.startswith("error")]
    for r in failed:
        print(f"echoplug-bench: {r.server}/{r.reactor} at {r.connections} active, "
              f"{r.idle} idle, {r.size} B: {r.status}", file=sys.stderr)
    print(f"echoplug-bench: wrote {out / 'results.csv'}, {out / 'results.json'} and "
          f"{out / 'results.md'}", file=sys.stderr)
    sys.stdout.write(report.markdown(rows, command=command, conditions=final) + "\n")
    return 0


def writeResults(rows: list[runner.Row], out: Path, command: str,
                 sweep: dict[str, object]) -> None:
    """results.csv, results.json and results.md, with the conditions so far."""
    report.writeCsv(rows, out / "results.csv", sweep)
    report.writeJson(rows, out / "results.json", sweep, command)
    (out / "results.md").write_text(report.markdown(rows, command=command, conditions=sweep))


if __name__ == "__main__":
    sys.exit(main())
