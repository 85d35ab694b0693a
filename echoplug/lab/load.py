# -*- test-case-name: tests.test_load -*-
"""
The lab's load generator: a closed-loop Twisted echo client, run as its own
process (C{python -m echoplug.lab.load}) so that the load never shares a process,
and so never a core's time slice, with the server it measures.

Two workloads:

  - C{load}: C{--connections} sockets each keep exactly one message of
    C{--size} bytes in flight; every echoed byte is checked against what was
    sent (messages rotate through a few random payloads, so an echo of a stale
    message is caught too) and each round trip is recorded in microseconds;
  - C{churn}: C{--connections} loops each connect, echo one message, close,
    and start over: the cost of a connection rather than of a message.

It warms up first, then measures for C{--duration} seconds. With C{--sync}
(how C{echoplug-bench} runs it) it prints C{ready} after the warm-up and
waits for C{go} on stdin, so that the runner can read the server's CPU time
at the start of the window; after the window it stops sending, lets the
messages in flight come back, prints one JSON line, and keeps its sockets
open until stdin closes, so closing them is not billed to the window.

The JSON line: C{messages} (round trips, or connections for churn, completed
since C{go}, including those drained after the window), C{inWindow} (those
completed within the window), C{seconds}, C{rttUs} (every round trip of the
window, in microseconds) and C{error} (a one-line reason, or null).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from echoplug.eager import eagerWriter

PAYLOADS = 4  # distinct payloads a connection rotates through


class LoadError(Exception):
    """A reason to stop: a mismatch, a refused or cut connection."""


class Run:
    """
    The state of one load process: counters, samples and the window.

    @ivar measuring: round trips are recorded (between C{go} and the end of
        the window).
    @ivar sending: new messages (or, for churn, connections) may start.
    """

    def __init__(self, reactor: Any, options: argparse.Namespace) -> None:
        self.reactor = reactor
        self.options = options
        rng = random.Random(options.seed)
        self.payloads = [rng.randbytes(options.size) for _ in range(PAYLOADS)]
        self.measuring = False
        self.sending = True
        self.messages = 0
        self.inWindow = 0
        self.rttNs: list[int] = []
        self.inFlight = 0
        self.error: str | None = None
        self.waiting: defer.Deferred[Any] | None = None
        self.drained: defer.Deferred[None] | None = None
        self.closers: list[Callable[[], None]] = []  # what closes the sockets at the end

    def fail(self, why: str) -> None:
        """Stop at once: the step being waited for fails with C{why}."""
        self.sending = False
        if self.error is None:
            self.error = why
        if self.waiting is not None and not self.waiting.called:
            self.waiting.errback(LoadError(why))

    def wait(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Wait for C{d}, but fail as soon as the run fails."""
        if self.error is not None:
            return defer.fail(LoadError(self.error))
        out: defer.Deferred[Any] = defer.Deferred()
        self.waiting = out

        def passOn(result: Any) -> None:
            if not out.called:
                if isinstance(result, Failure):
                    out.errback(result)
                else:
                    out.callback(result)

        d.addBoth(passOn)
        return out

    def completed(self, rttNs: int) -> None:
        """One round trip (or churned connection) came back whole and right."""
        if self.measuring:
            self.inWindow += 1
            self.rttNs.append(rttNs)
        if self.drained is not None or self.measuring:
            self.messages += 1

    def startWindow(self) -> None:
        self.messages = self.inWindow = 0
        self.rttNs = []
        self.measuring = True

    def endWindow(self) -> defer.Deferred[None]:
        """Stop sending; fire once every message in flight is back."""
        self.measuring = False
        self.sending = False
        self.drained = defer.Deferred()
        self.checkDrained()
        return self.drained

    def checkDrained(self) -> None:
        if self.drained is not None and self.inFlight == 0 and not self.drained.called:
            self.drained.callback(None)


class LoadProtocol(Protocol):
    """
    One connection of the C{load} workload: one message in flight, each echo
    checked byte for byte before the next is sent.
    """

    factory: LoadFactory
    transport: ITCPTransport
    write: Callable[[bytes], None]

    def __init__(self) -> None:
        self.received = bytearray()
        self.index = 0
        self.sentAt = 0
        self.expected = b""
        self.open = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        # Send at once, as asyncio does (echoplug.eager): a write on the
        # reactor's next turn would let the client, not the server, set the
        # pace on one connection, and an idler server spends more CPU per
        # message (it sleeps and wakes for each).
        self.write = eagerWriter(self.transport)
        self.open = True
        self.factory.connected(self)

    def send(self) -> None:
        run = self.factory.run
        if not run.sending:
            return
        self.index = (self.index + 1) % PAYLOADS
        self.expected = run.payloads[self.index]
        run.inFlight += 1
        self.sentAt = time.perf_counter_ns()
        self.write(self.expected)

    def dataReceived(self, data: bytes) -> None:
        if not self.received and data == self.expected:
            # The common case: the whole echo in one read.
            self.done()
            return
        self.received += data
        size = len(self.expected)
        if len(self.received) < size:
            if self.received != self.expected[: len(self.received)]:
                self.mismatch()
            return
        if self.received != self.expected:
            self.mismatch()
            return
        self.received.clear()
        self.done()

    def done(self) -> None:
        run = self.factory.run
        run.inFlight -= 1
        run.completed(time.perf_counter_ns() - self.sentAt)
        if run.sending:
            self.send()
        else:
            run.checkDrained()

    def mismatch(self) -> None:
        self.factory.run.fail(
            f"echo mismatch on a {len(self.expected)}-byte message: "
            f"got {bytes(self.received[:16])!r}... back"
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.open and not self.factory.closing:
            self.factory.run.fail(f"connection lost: {reason.getErrorMessage()}")
        self.open = False


class LoadFactory(ClientFactory["LoadProtocol"]):
    """Open C{count} connections one after another, then start them all."""

    protocol = LoadProtocol
    noisy = False

    def __init__(self, run: Run, count: int) -> None:
        self.run = run
        self.count = count
        self.protocols: list[LoadProtocol] = []
        self.closing = False
        self.ready: defer.Deferred[None] = defer.Deferred()

    def start(self) -> None:
        self.connectOne()

    def connectOne(self) -> None:
        # One at a time: a burst of connects could overflow the server's
        # listen backlog, and a dropped SYN costs a second's retransmit.
        options = self.run.options
        self.run.reactor.connectTCP(options.host, options.port, self, timeout=10)

    def connected(self, p: LoadProtocol) -> None:
        self.protocols.append(p)
        if len(self.protocols) < self.count:
            self.connectOne()
        else:
            for each in self.protocols:
                each.send()
            self.ready.callback(None)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.run.fail(f"cannot connect: {reason.getErrorMessage()}")

    def closeAll(self) -> None:
        self.closing = True
        for p in self.protocols:
            if p.open:
                p.transport.loseConnection()


class ChurnProtocol(Protocol):
    """One connection of the C{churn} workload: connect, echo, close."""

    factory: ChurnFactory
    transport: ITCPTransport

    def __init__(self) -> None:
        self.received = bytearray()
        self.ok = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.factory.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        payload = self.factory.payload
        if self.received != payload[: len(self.received)]:
            self.factory.run.fail("echo mismatch on a churned connection")
        elif len(self.received) == len(payload):
            self.ok = True
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.lost(self)


class ChurnFactory(ClientFactory["ChurnProtocol"]):
    """One churn loop: each closed connection starts the next."""

    protocol = ChurnProtocol
    noisy = False

    def __init__(self, run: Run, payload: bytes) -> None:
        self.run = run
        self.payload = payload
        self.startedAt = 0

    def start(self) -> None:
        run = self.run
        if not run.sending:
            run.checkDrained()
            return
        run.inFlight += 1
        self.startedAt = time.perf_counter_ns()
        options = run.options
        run.reactor.connectTCP(options.host, options.port, self, timeout=10)

    def lost(self, p: ChurnProtocol) -> None:
        run = self.run
        run.inFlight -= 1
        if not p.ok:
            run.fail("connection closed before the whole echo came back")
            return
        run.completed(time.perf_counter_ns() - self.startedAt)
        self.start()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.run.inFlight -= 1
        self.run.fail(f"cannot connect: {reason.getErrorMessage()}")


class Control(Protocol):
    """
    The runner's words on stdin: C{go} starts the window; C{quit}, or
    stdin closing, lets the process close its sockets and exit.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.words: dict[str, defer.Deferred[None]] = {
            "go": defer.Deferred(), "quit": defer.Deferred()}
        # Either word closing stdin is the runner being done with us.
        self.words["quit"].addErrback(lambda f: None)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            d = self.words.get(line.strip().decode("ascii", "replace"))
            if d is not None and not d.called:
                d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for word, d in self.words.items():
            if not d.called:
                d.errback(LoadError(f"stdin closed before {word!r}"))


def say(control: Control | None, line: str) -> None:
    """
    Write one line of output. Under C{--sync} it goes through the stdio
    transport: StandardIO makes stdout non-blocking, so a plain
    C{sys.stdout.write} of a long result could fail half-way.
    """
    if control is not None:
        assert control.transport is not None
        control.transport.write(line.encode() + b"\n")
    else:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


async def drive(reactor: Any, options: argparse.Namespace, run: Run,
                control: Control | None) -> dict[str, Any]:
    """Connect, warm up, measure one window, drain; return the result."""
    from twisted.internet.task import deferLater

    closers: list[Any] = []
    if options.workload == "load":
        factory = LoadFactory(run, options.connections)
        factory.start()
        closers.append(factory.closeAll)
        await run.wait(factory.ready)
    else:
        payload = run.payloads[0]
        for _ in range(options.connections):
            ChurnFactory(run, payload).start()
    await run.wait(deferLater(reactor, options.warmup, lambda: None))
    if control is not None:
        say(control, "ready")
        await run.wait(control.words["go"])
    run.startWindow()
    started = time.perf_counter()
    await run.wait(deferLater(reactor, options.duration, lambda: None))
    seconds = time.perf_counter() - started
    drained = run.endWindow()
    drained.addTimeout(10, reactor)
    await run.wait(drained)
    result = {
        "workload": options.workload,
        "messages": run.messages,
        "inWindow": run.inWindow,
        "seconds": seconds,
        "rttUs": [ns // 1000 for ns in run.rttNs],
        "error": None,
    }
    run.closers = closers
    return result


def parseArgs(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m echoplug.lab.load",
        description="Closed-loop echo load: each connection keeps one message in flight "
        "and checks every byte that comes back. Prints one JSON line.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workload", choices=["load", "churn"], default="load")
    parser.add_argument("--connections", type=int, default=1,
                        help="connections (load) or parallel loops (churn) [1]")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes [64]")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured [2]")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before [0.5]")
    parser.add_argument("--reactor", default="epoll", help="the client's reactor [epoll]")
    parser.add_argument("--seed", type=int, default=862)
    parser.add_argument("--sync", action="store_true",
                        help="print 'ready' after the warm-up, wait for 'go' on stdin, "
                        "and hold the sockets open until stdin closes")
    options = parser.parse_args(argv)
    if options.connections < 1 or options.size < 1 or not options.duration > 0:
        parser.error("--connections and --size must be at least 1, --duration above 0")
    if options.warmup < 0:
        parser.error("--warmup must not be negative")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parseArgs(argv)
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # where a stuck client is: kill -USR1 PID
    from echoplug.reactors import install

    reactor = install(options.reactor, prog="python -m echoplug.lab.load")
    run = Run(reactor, options)
    outcome: dict[str, Any] = {}
    control: Control | None = None
    if options.sync:
        from twisted.internet import stdio

        control = Control()
        stdio.StandardIO(control, reactor=reactor)

    async def body() -> None:
        try:
            outcome.update(await drive(reactor, options, run, control))
        except LoadError as e:
            outcome["error"] = str(e)
        except defer.TimeoutError:
            outcome["error"] = "timed out waiting for the echoes in flight"
        if "messages" not in outcome:
            outcome.update(workload=options.workload, messages=0, inWindow=0,
                           seconds=0.0, rttUs=[])
        say(control, json.dumps(outcome, separators=(",", ":")))
        if control is not None:
            # Hold the sockets open (and let the transport flush the line)
            # until the runner has read the server's CPU time and says quit.
            await control.words["quit"]
        for close in run.closers:
            close()

    def start(reactor: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(body())

    from twisted.internet.task import react

    try:
        react(start, [], _reactor=reactor)
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    return 1 if outcome.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
