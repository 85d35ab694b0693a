# -*- test-case-name: tests.test_books -*-
"""
The counters of every C{--workers} worker, in memory they all share.

The parent creates one small shared file (a memfd) with a slot per worker
and passes it to each worker, which maps it and writes its own slot as its
connections open and close: once per connection, never per message. The
parent reads every slot when Prometheus scrapes or systemd wants a status
line, and each worker reads the others' open counts to keep to its fair
share of connections (L{FairShare}).

Why not prometheus_client's multiprocess mode: it has no custom collectors,
and echoplug's metrics are computed at scrape time from the factory's own
books. Why not counters sent over a pipe: a worker killed with SIGKILL would
take what it had not yet sent with it. Shared memory survives the worker:
when one dies the parent folds its last counts into L{Books.retired} and
clears the slot for its successor, so the totals never go back.

Each value is one aligned 8-byte integer with a single writer (the worker
owning the slot, or the parent while the slot has no worker), so a reader
sees each value whole; no value depends on another being read at the same
instant.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from echoplug.factory import PROXY_FAILURES

#: The values in each slot, in order. C{pid} is non-zero while the slot's
#: worker is listening; C{closedIn}/C{closedOut} are the bytes received and
#: sent on its closed connections (the factory's running totals), and
#: C{header:REASON} its PROXY header failures: written as connections open
#: and close. C{buffered} and C{stalls} (the C{--max-buffered} bound) and the
#: C{udp*} counters (its L{echoplug.udp.DatagramGuards}) change per message
#: or datagram, so the worker copies them about once a second, and only for
#: --metrics.
UDP_REASONS = ("empty", "low_port", "own_port", "bad_source", "rate_source", "rate_total",
               "send_failed")
FIELDS = ("pid", "accepted", "refused", "open", "closedIn", "closedOut", "buffered", "stalls",
          "udpReceived", "udpReceivedBytes", "udpSent", "udpSentBytes",
          *(f"header:{r}" for r in PROXY_FAILURES), *(f"udpDropped:{r}" for r in UDP_REASONS))
(PID, ACCEPTED, REFUSED, OPEN, CLOSED_IN, CLOSED_OUT, BUFFERED, STALLS,
 UDP_RECEIVED, UDP_RECEIVED_BYTES, UDP_SENT, UDP_SENT_BYTES) = range(12)
#: The index of each PROXY failure reason's field, and each UDP drop reason's.
HEADER = {r: FIELDS.index(f"header:{r}") for r in PROXY_FAILURES}
UDP_DROPPED = {r: FIELDS.index(f"udpDropped:{r}") for r in UDP_REASONS}
#: What a dead worker's slot adds to the totals: every field that counts
#: (not its pid, nor what is open or buffered now).
KEPT = tuple(i for i in range(len(FIELDS)) if i not in (PID, OPEN, BUFFERED))


class Books:
    """
    C{slots} slots of L{FIELDS}, each an int64, laid out field by field (the
    open counts of every worker side by side, so a worker sums them in one
    slice).

    @ivar fd: the shared file, to pass to a worker.
    @ivar retired: what dead workers counted, by L{KEPT} field (parent only).
    """

    def __init__(self, slots: int = 0, fd: int | None = None) -> None:
        slotSize = 8 * len(FIELDS)
        if fd is None:
            fd = createShared(slotSize * slots)
        else:
            # A worker maps the parent's file, whatever its own options say.
            slots = os.fstat(fd).st_size // slotSize
        size = slotSize * slots
        self.fd = fd
        self.slots = slots
        self.map = mmap.mmap(fd, size)  # MAP_SHARED
        self.values = memoryview(self.map).cast("q")
        self.retired = dict.fromkeys(KEPT, 0)

    def index(self, slot: int, field: int) -> int:
        return field * self.slots + slot

    def get(self, slot: int, field: int) -> int:
        return int(self.values[field * self.slots + slot])

    def set(self, slot: int, field: int, value: int) -> None:
        self.values[field * self.slots + slot] = value

    def column(self, field: int) -> list[int]:
        start = field * self.slots
        return self.values[start:start + self.slots].tolist()

    def openAndAlive(self) -> tuple[int, int]:
        """Open connections over the listening workers, and how many listen."""
        alive = sum(1 for pid in self.column(PID) if pid)
        return sum(self.column(OPEN)), alive

    def retire(self, slot: int) -> None:
        """Fold a dead worker's counts into L{retired} and clear its slot."""
        for field in KEPT:
            self.retired[field] += self.get(slot, field)
        for field in range(len(FIELDS)):
            self.set(slot, field, 0)

    def total(self, field: int) -> int:
        return sum(self.column(field))

    def counted(self, field: int) -> int:
        """The total of a counting field, dead workers' counts included."""
        return self.retired.get(field, 0) + self.total(field)


def createShared(size: int) -> int:
    """A file of C{size} zero bytes that only descriptors reach: a memfd, or
    an unlinked temporary file where memfd_create is missing or filtered."""
    try:
        fd = os.memfd_create("echoplug-books")
    except (AttributeError, OSError):
        handle, path = tempfile.mkstemp(prefix="echoplug-books-")
        os.unlink(path)
        fd = handle
    os.ftruncate(fd, size)
    return fd


class Totals:
    """
    Every worker's books, summed, with the attributes of an L{EchoFactory}
    that the metrics collector and the systemd status line read: one scrape
    of the parent covers every worker, dead ones included.
    """

    def __init__(self, books: Books) -> None:
        self.books = books

    @property
    def accepted(self) -> int:
        return self.books.counted(ACCEPTED)

    @property
    def refused(self) -> int:
        return self.books.counted(REFUSED)

    @property
    def connections(self) -> range:
        # Only its length is read (len(factory.connections)).
        return range(self.books.total(OPEN))

    @property
    def bytesReceived(self) -> int:
        return self.books.counted(CLOSED_IN)

    @property
    def bytesSent(self) -> int:
        return self.books.counted(CLOSED_OUT)

    @property
    def headerFailures(self) -> dict[str, int]:
        return {r: self.books.counted(i) for r, i in HEADER.items()}

    @property
    def bound(self) -> BoundTotals:
        return BoundTotals(self.books)

    def bySlot(self) -> Iterator[tuple[int, dict[str, int]]]:
        """Each slot's current values, by L{FIELDS} name."""
        for slot in range(self.books.slots):
            yield slot, {name: self.books.get(slot, i) for i, name in enumerate(FIELDS)}


class BoundTotals:
    """The C{--max-buffered} books of every worker, as the metrics read a bound's."""

    def __init__(self, books: Books) -> None:
        self.total = books.total(BUFFERED)
        self.stalls = books.counted(STALLS)


class DatagramTotals:
    """
    Every worker's UDP counters, summed, with the attributes of a
    L{echoplug.udp.DatagramGuards} that the metrics read.
    """

    def __init__(self, books: Books) -> None:
        self.books = books

    @property
    def received(self) -> int:
        return self.books.counted(UDP_RECEIVED)

    @property
    def receivedBytes(self) -> int:
        return self.books.counted(UDP_RECEIVED_BYTES)

    @property
    def sent(self) -> int:
        return self.books.counted(UDP_SENT)

    @property
    def sentBytes(self) -> int:
        return self.books.counted(UDP_SENT_BYTES)

    @property
    def dropped(self) -> dict[str, int]:
        return {r: self.books.counted(i) for r, i in UDP_DROPPED.items()}


class FairShare:
    """
    Keep one worker to about its share of the open connections.

    Every worker waits on the same listening socket. A new connection wakes
    all of them (epoll, poll and select are level-triggered here) and the
    first to call accept() takes it, so a worker that happens to run first
    can take most connections while the others find nothing. A worker with
    more than the mean plus L{slack} open connections therefore stops
    reading its listening ports until the others catch up. One with no more
    than the mean always reads, so some worker is always accepting and a
    connection waits, at worst, in the kernel's backlog; it is never refused.
    C{rearm} is called on each port it resumes (the worker passes
    L{echoplug._twisted.exclusiveWakeup}).

    @ivar ports: the listening ports to pause and resume.
    """

    #: Connections over the mean before a worker steps back.
    slack = 2
    #: Seconds between checks while paused, for the others to catch up.
    interval = 0.02

    def __init__(self, books: Books, slot: int, reactor: Any,
                 rearm: Callable[[Any], object] = lambda port: None) -> None:
        self.books = books
        self.slot = slot
        self.reactor = reactor
        self.rearm = rearm
        self.ports: list[Any] = []
        self.paused = False
        self._timer: Any = None

    def over(self) -> bool:
        total, alive = self.books.openAndAlive()
        if alive < 2:
            return False
        mine = self.books.get(self.slot, OPEN)
        return mine * alive > total + self.slack * alive

    def check(self) -> None:
        """Pause or resume accepting, after this worker's open count changed."""
        over = self.over()
        if over and not self.paused:
            self.paused = True
            for port in self.ports:
                port.stopReading()
        elif not over and self.paused:
            self.paused = False
            for port in self.ports:
                port.startReading()
                self.rearm(port)
        if self.paused and self._timer is None:
            self._timer = self.reactor.callLater(self.interval, self._recheck)

    def _recheck(self) -> None:
        self._timer = None
        self.check()

    def stop(self) -> None:
        """Forget the ports (they stopped listening) and any pending check."""
        self.ports = []
        self.paused = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
