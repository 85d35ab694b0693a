"""
Tests of L{echoplug.books}: the shared counters, what a dead worker leaves
in the totals, and the fair share; and of L{echoplug.workers.WorkersNotifier}'s
watchdog rule. In-process: the processes are in tests/test_workers.py.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock

from echoplug.books import (
    ACCEPTED,
    BUFFERED,
    CLOSED_IN,
    HEADER,
    OPEN,
    PID,
    STALLS,
    UDP_DROPPED,
    UDP_REASONS,
    UDP_SENT_BYTES,
    Books,
    DatagramTotals,
    FairShare,
    Totals,
)
from echoplug.workers import WorkersNotifier


def test_a_second_mapping_sees_the_first() -> None:
    parent = Books(3)
    child = Books(fd=os.dup(parent.fd))  # what a worker maps
    assert child.slots == 3
    child.set(1, ACCEPTED, 7)
    assert parent.get(1, ACCEPTED) == 7
    assert Totals(parent).accepted == 7


def test_retired_worker_stays_counted() -> None:
    books = Books(2)
    totals = Totals(books)
    books.set(0, ACCEPTED, 150)
    books.set(0, CLOSED_IN, 1000)
    books.set(0, OPEN, 3)
    books.set(0, BUFFERED, 4096)
    books.set(0, STALLS, 2)
    books.set(0, HEADER["timeout"], 5)
    books.set(0, UDP_SENT_BYTES, 77)
    books.set(1, ACCEPTED, 50)
    books.set(1, BUFFERED, 10)
    books.retire(0)
    assert books.column(ACCEPTED) == [0, 50]
    assert len(totals.connections) == 0
    assert (totals.bound.total, totals.bound.stalls) == (10, 2)  # a gauge, and a counter
    books.set(0, ACCEPTED, 1)  # its successor
    books.set(0, HEADER["timeout"], 1)
    assert totals.accepted == 201
    assert totals.bytesReceived == 1000
    assert totals.headerFailures["timeout"] == 6
    assert DatagramTotals(books).sentBytes == 77


def test_books_know_every_udp_drop_reason() -> None:
    from echoplug.udp import REASONS

    assert UDP_REASONS == REASONS
    assert set(DatagramTotals(Books(1)).dropped) == set(UDP_DROPPED) == set(REASONS)


class Port:
    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_fair_share_pauses_over_the_mean_and_resumes() -> None:
    books, clock = Books(2), Clock()
    share = FairShare(books, 0, clock)
    port = Port()
    share.ports.append(port)
    books.set(0, PID, 100)
    books.set(1, PID, 101)
    books.set(0, OPEN, FairShare.slack * 2 + 1)
    share.check()
    assert not port.reading
    books.set(1, OPEN, FairShare.slack * 2)  # the other caught up
    clock.advance(FairShare.interval)
    assert port.reading


def test_fair_share_never_pauses_the_only_worker() -> None:
    books = Books(2)
    share = FairShare(books, 0, Clock())
    port = Port()
    share.ports.append(port)
    books.set(0, PID, 100)  # slot 1's worker is restarting: not listening
    books.set(0, OPEN, 1000)
    share.check()
    assert port.reading


class Arbiter:
    def __init__(self) -> None:
        self.count = 2
        self.workers: dict = {}
        self.factory = Totals(Books(2))
        self.alive = True

    def allAlive(self) -> bool:
        return self.alive


def test_watchdog_only_while_every_worker_is_alive() -> None:
    arbiter = Arbiter()
    notifier = WorkersNotifier(arbiter, {}, watchdog=1.0)  # type: ignore[arg-type]
    sent: list[tuple[str, ...]] = []
    notifier.send = lambda *lines: sent.append(lines)  # type: ignore[method-assign]
    notifier.tick()
    assert "WATCHDOG=1" in sent[-1]
    assert sent[-1][-1].startswith("STATUS=workers: 0/2 up; connections: 0 open")
    arbiter.alive = False
    notifier.tick()
    notifier.tick()
    assert all("WATCHDOG=1" not in lines for lines in sent[1:])


class Ended:
    """A worker's processEnded reason: killed by SIGKILL."""

    class value:
        signal = 9
        exitCode = None


def test_restart_backoff_grows_and_starts_over_once_stable() -> None:
    from echoplug import workers

    clock = Clock()
    arbiter = workers.Arbiter(1, [], {}, reactor=clock)
    spawned: list[int] = []
    arbiter.spawn = spawned.append  # type: ignore[method-assign]
    delays = []
    for _ in range(4):
        proto = workers.WorkerProcess(arbiter, 1)
        arbiter.workers[1] = proto
        arbiter.workerEnded(proto, Ended())  # type: ignore[arg-type]
        call = arbiter._restartCalls[1]
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert spawned == [1, 1, 1, 1]
    assert delays[0] < 0.25 and delays[1] > delays[0] and delays[3] >= 0.8
    # One that listened for STABLE seconds died once, not again.
    proto = workers.WorkerProcess(arbiter, 1)
    proto.listeningSince = workers.time.monotonic() - workers.STABLE
    arbiter.workerEnded(proto, Ended())  # type: ignore[arg-type]
    assert arbiter._restartCalls[1].getTime() - clock.seconds() < 0.25
