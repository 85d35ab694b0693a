# -*- test-case-name: tests.test_buffers -*-
"""
C{--max-buffered}: one bound on the bytes echoplug holds in user space for
all connections together.

Each connection already bounds itself: its transport pauses reading once
more than C{bufferSize} (64 KiB) waits to be sent, so a client that writes
and never reads costs about 128 KiB (that buffer plus one read). Ten
thousand of them cost a gigabyte. L{BufferBound} keeps a running total of
what connections may hold and:

  - over the bound, stops reading on a connection as soon as it holds
    output, until that output has drained (a connection with nothing
    queued keeps flowing);
  - as the total nears the bound, shrinks the read size (and so the
    per-connection pause threshold, the same C{bufferSize}) of every
    connection, so that reads already under way cannot overshoot it far.

It costs nothing on the fast path. The total changes only when a
connection's send buffer goes from empty to holding bytes (the eager write
knows: L{queued}), when its transport pauses it (L{paused}), when the buffer
is empty again (L{drained}) and when it closes (L{lost}). An echo whose
client keeps up never queues a byte, and never gets here.

A connection counted by L{queued} is counted at its read size, the most it
can hold before its transport pauses it; once paused it is counted at what
it really holds. So the total is an upper bound, except for TLS
connections (no eager write): they are counted once their transport pauses
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from echoplug import _twisted

if TYPE_CHECKING:
    from echoplug.protocol import Echo

#: The smallest read size: one read per connection, past the bound, is the
#: overshoot (1,000 connections: 1 MiB).
MIN_READ = 1024
#: (fraction of the bound, read size from there on), from the top.
LEVELS = ((1.0, MIN_READ), (0.75, 4096), (0.5, 16384))


class BufferBound:
    """
    The total that connections hold, and the read size that follows it.

    @ivar limit: the bound, in bytes.
    @ivar total: what the connections hold (or may hold) now.
    @ivar readSize: the read size every connection has now.
    @ivar stalls: connections stopped since start because the total was over
        the bound (a counter for the metrics).
    @ivar relaxDelay: seconds between two raises of the read size: it is
        lowered at once, but raised at most this often, so that a total
        going up and down across a level costs a pass over the connections
        only that often.
    """

    relaxDelay = 0.5

    def __init__(self, limit: int, connections: set[Echo], clock: Any) -> None:
        self.limit = limit
        self.connections = connections
        self.clock = clock
        self.total = 0
        self.stalls = 0
        self.top = min(_twisted.DEFAULT_BUFFER_SIZE, max(MIN_READ, limit >> 4))
        self.readSize = self.top
        self._thresholds = [(int(limit * f), size) for f, size in LEVELS]
        self._relaxCall: Any = None

    def levelFor(self, total: int) -> int:
        """The read size for a total of C{total} bytes."""
        for threshold, size in self._thresholds:
            if total >= threshold:
                return min(size, self.top)
        return self.top

    def connected(self, proto: Echo) -> None:
        """A new connection reads at the current size."""
        if self.readSize != _twisted.DEFAULT_BUFFER_SIZE:
            _twisted.setReadSize(proto.transport, self.readSize)

    def queued(self, proto: Echo) -> None:
        """
        C{proto}'s send buffer has just gone from empty to holding bytes,
        and its transport did not pause it.
        """
        if proto.held or proto.transport.producerPaused:
            return  # its transport paused it as the bytes were queued: counted
        if self.total >= self.limit:
            # Over the bound: no more reading here until the buffer drains
            # (the transport calls resumeProducing then, as after its own pause).
            self.stalls += 1
            _twisted.watchDrain(proto.transport)
            proto.pauseProducing()
        else:
            # Have the transport tell us when the buffer is empty again.
            _twisted.watchDrain(proto.transport)
            self._hold(proto, self.readSize)

    def paused(self, proto: Echo) -> None:
        """C{proto}'s transport has stopped reading: count what it holds."""
        self._hold(proto, max(1, _twisted.unsentBytes(_twisted.socketTransport(
            proto.transport))))

    def drained(self, proto: Echo) -> None:
        """C{proto}'s send buffer is empty."""
        if proto.held:
            self._hold(proto, 0)

    lost = drained

    def _hold(self, proto: Echo, n: int) -> None:
        self.total += n - proto.held
        proto.held = n
        size = self.levelFor(self.total)
        if size < self.readSize:
            self._apply(size)
        elif size > self.readSize and self._relaxCall is None:
            self._relaxCall = self.clock.callLater(self.relaxDelay, self._relax)

    def _relax(self) -> None:
        self._relaxCall = None
        size = self.levelFor(self.total)
        if size > self.readSize:
            self._apply(size)

    def _apply(self, size: int) -> None:
        """Give every connection read size C{size}: a pass, at a change of level."""
        self.readSize = size
        for p in self.connections:
            _twisted.setReadSize(p.transport, size)

    def stop(self) -> None:
        if self._relaxCall is not None and self._relaxCall.active():
            self._relaxCall.cancel()
        self._relaxCall = None
