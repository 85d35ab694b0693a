# -*- test-case-name: tests.test_factory -*-
"""
The factory: builds L{Echo} protocols and keeps the books on open connections.

Everything that is per-server rather than per-byte lives here, beside the
protocol rather than inside it: the set of open connections (for draining),
the counters, the access log written when a connection closes, and the
limits. Limits are checked once per connection (caps, in C{buildProtocol}, or
for the per-peer cap under the PROXY protocol once the header names the
client: L{EchoFactory.admit}) or once per sweep (the idle timeout), never per message:
C{twisted.protocols.policies}' wrappers would put a call on every message and
lose half-close on the way.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IReactorTime, ITransport
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from echoplug._twisted import socketTransport, unsentBytes
from echoplug.logs import LEVELS, LogLine, formatAddress
from echoplug.protocol import Books, Echo, TracingEcho

#: C{--proxy-protocol} modes (L{echoplug.proxied}).
PROXY_MODES = ("off", "optional", "required")
#: Why a PROXY header failed: the metrics' C{reason} label.
PROXY_FAILURES = ("malformed", "oversized", "incomplete", "missing", "timeout")


class RateLimitedLog:
    """
    Warnings of one kind, at most one line per C{interval} seconds: a flood
    of refusals or bad headers must not flood the log. The first of a burst
    is logged at once; the rest are counted, and one line sums them up when
    the interval has passed.
    """

    def __init__(self, log: Logger, clock: Any, summary: str, interval: float = 1.0,
                 more: str = " (and {n} more before)") -> None:
        self.log = log
        self.more = more  # a format with {n}: how many the first line of a burst sums up
        self.clock = clock
        self.summary = summary  # a format with {n}
        self.interval = interval
        self.last = -1e9
        self.suppressed = 0
        self.flushCall: Any = None

    def __call__(self, format: str, **fields: Any) -> None:
        """Log C{format} (which ends with C{{more}}) now, or count it for later."""
        now = self.clock.seconds()
        if now - self.last >= self.interval:
            n, self.suppressed = self.suppressed, 0
            self.last = now
            self.log.warn(format, more=self.more.format(n=n) if n else "",
                          suppressed=n, **fields)
        else:
            self.suppressed += 1
            if self.flushCall is None:
                self.flushCall = self.clock.callLater(
                    self.last + self.interval - now, self._flush)

    def _flush(self) -> None:
        self.flushCall = None
        if self.suppressed:
            n, self.suppressed = self.suppressed, 0
            self.last = self.clock.seconds()
            self.log.warn(self.summary, n=n)


class EchoFactory(Books):
    """
    Build echo protocols and account for them.

    @ivar connections: the open connections.
    @ivar accepted: connections served since start.
    @ivar bytesEchoed: bytes received on closed connections (each one was
        echoed back, unless the connection was cut first); add
        C{openBytes()} for the total including open ones.
    @ivar refused: connections closed at once, unserved, because of a cap.
    @ivar maxConnections: the cap on open connections, or C{None}.
    @ivar maxPerPeer: the cap on open connections from one IP, or C{None}.
    @ivar perPeer: open connections by client IP (kept only under a per-peer cap).
    @ivar idleTimeout: seconds without traffic before L{sweepIdle} closes a
        connection, or C{None}.
    @ivar fdWall: under the select reactor, FD_SETSIZE: a connection whose
        descriptor reaches it is closed before select() ever sees it.
    @ivar bytesSent: bytes sent on closed connections: what they received
        less what was still unsent when they closed (an aborted or reset
        connection drops its buffer). Counted once per connection, at close,
        so the per-message path stays as it is.
    @ivar proxyProtocol: C{off}, C{optional} or C{required}: whether each
        connection starts with a PROXY header (L{echoplug.proxied}).
    @ivar proxyTimeout: seconds a connection has to send its whole header.
    @ivar headerFailures: connections closed for a bad PROXY header, by
        reason (L{PROXY_FAILURES}).
    """

    refusalLogInterval = 1.0  # at most one refusal line per this many seconds

    log = Logger()
    noisy = False  # no "Starting factory" lines: the service logs its own.

    def __init__(
        self,
        trace: bool = False,
        logLevel: str = "info",
        maxConnections: int | None = None,
        maxPerPeer: int | None = None,
        idleTimeout: float | None = None,
        clock: IReactorTime | None = None,
        proxyProtocol: str = "off",
        proxyTimeout: float = 5.0,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock: Any = clock
        self.protocol = TracingEcho if trace else Echo
        if proxyProtocol not in PROXY_MODES:
            raise ValueError(f"proxyProtocol {proxyProtocol!r}: one of {PROXY_MODES}")
        self.proxyProtocol = proxyProtocol
        self.proxyTimeout = proxyTimeout
        self.headerFailures = dict.fromkeys(PROXY_FAILURES, 0)
        if proxyProtocol != "off":
            from echoplug.proxied import ProxyEcho, TracingProxyEcho

            self.protocol = TracingProxyEcho if trace else ProxyEcho
        level = LEVELS[logLevel]
        # Decided once, so the per-connection path tests a bool, not a level.
        self.logOpen = level <= LEVELS["debug"]
        self.logClose = level <= LEVELS["info"]
        # The access log: one line per connection, built cheaply (LogLine).
        self.openLine = LogLine(self.log, LogLevel.debug, "open {peer}")
        self.closeLine = LogLine(
            self.log, LogLevel.info,
            "close {peer} after {duration:.3f}s, {bytes} bytes echoed, {why}")
        # The same lines for a client named by a PROXY header: its balancer too.
        self.openViaLine = LogLine(self.log, LogLevel.debug, "open {peer} via {via}")
        self.closeViaLine = LogLine(
            self.log, LogLevel.info,
            "close {peer} via {via} after {duration:.3f}s, {bytes} bytes echoed, {why}")
        self.connections: set[Echo] = set()
        self.accepted = 0
        self.bytesEchoed = 0
        self.bytesSent = 0
        self.refused = 0
        self.maxConnections = maxConnections
        self.maxPerPeer = maxPerPeer
        self.perPeer: dict[str, int] = {}
        self.idleTimeout = idleTimeout
        self.fdWall: int | None = None
        self.refusalLog = RateLimitedLog(self.log, self.clock, "refused {n} more connections "
                                         "(over a cap)", self.refusalLogInterval,
                                         more=" (and {n} more refused before)")
        self.headerLog = RateLimitedLog(self.log, self.clock, "closed {n} more connections "
                                        "for a bad PROXY header", self.refusalLogInterval)
        self._emptyWaiters: list[defer.Deferred[None]] = []

    protocol: type[Echo]

    def buildProtocol(self, addr: IAddress | None) -> Echo | None:
        # Returning None makes the listening port close the new socket at
        # once: the client sees EOF (or a reset), and is never served.
        if self.maxConnections is not None and len(self.connections) >= self.maxConnections:
            self.refuse(addr, f"at --max-connections {self.maxConnections}")
            return None
        host = None
        if self.maxPerPeer is not None and self.proxyProtocol == "off":
            # Under the PROXY protocol addr is the balancer: admit() caps
            # the client the header names instead.
            host = getattr(addr, "host", None)  # None for UNIX sockets: not capped
            if host is not None and self.perPeer.get(host, 0) >= self.maxPerPeer:
                self.refuse(addr, f"at --max-connections-per-peer {self.maxPerPeer} for {host}")
                return None
        p = self.protocol()
        p.factory = self
        if host is not None:
            p.peerHost = host
        return p

    def refuse(self, addr: IAddress | None, why: str) -> None:
        """
        Count a refused connection and log it, at most one line per
        L{refusalLogInterval}: a flood of refusals must not flood the log.
        """
        self.refused += 1
        self.refusalLog("refused {peer}: {why}{more}", peer=formatAddress(addr), why=why)

    def admit(self, proto: Echo) -> bool:
        """
        Serve a connection whose PROXY header has been read (or, in optional
        mode, that has none): apply the per-peer cap to the client it names,
        then count and log it as L{connectionMade} does for any other.
        Return C{False} if the cap refused it (it is then closed).
        """
        transport: Any = proto.transport
        addr: Any = proto.client or transport.getPeer()
        if self.maxPerPeer is not None:
            host = getattr(addr, "host", None)  # None for UNIX sockets: not capped
            if host is not None:
                if self.perPeer.get(host, 0) >= self.maxPerPeer:
                    self.refuse(addr, f"at --max-connections-per-peer {self.maxPerPeer} "
                                f"for {host}")
                    proto.close("refused")
                    return False
                proto.peerHost = host
        proto.admitted = True
        self._serve(proto)
        return True

    def headerFailed(self, proto: Echo, reason: str, why: str) -> None:
        """
        Count a connection closed for a bad PROXY header (or none in time)
        and log it, at most one line a second: garbage is what an attacker
        can send fastest.
        """
        self.headerFailures[reason] += 1
        transport: Any = proto.transport
        self.headerLog("bad PROXY header from {peer}: {why}{more}",
                       peer=formatAddress(proto.client or transport.getPeer()), why=why,
                       reason=reason)

    def _serve(self, proto: Echo) -> None:
        self.accepted += 1
        if proto.peerHost is not None:
            self.perPeer[proto.peerHost] = self.perPeer.get(proto.peerHost, 0) + 1
        if self.logOpen:
            if proto.via is None:
                self.openLine(peer=self.peerOf(proto.transport))
            else:
                self.openViaLine(peer=formatAddress(proto.client),
                                 via=formatAddress(proto.via))

    def connectionMade(self, proto: Echo) -> None:
        if self.fdWall is not None and fileno(proto.transport) >= self.fdWall:
            # Under select(), a descriptor at FD_SETSIZE or above would make
            # the reactor drop connections and even listening ports. Close it
            # before the reactor selects again. Rare: the cap keeps us below.
            proto.counted = False
            self.refuse(proto.transport.getPeer(), f"descriptor at or over {self.fdWall} "
                        "(the select reactor's limit)")
            proto.transport.abortConnection()
            return
        self.connections.add(proto)
        if proto.admitted:  # False until a PROXY header is read: admit()
            self._serve(proto)

    def connectionLost(self, proto: Echo, reason: Failure) -> None:
        if not proto.counted:
            return
        self.connections.discard(proto)
        if self._emptyWaiters and not self.connections:
            waiters, self._emptyWaiters = self._emptyWaiters, []
            for d in waiters:
                self.clock.callLater(0, d.callback, None)
        if not proto.admitted:
            return  # never served: its bad header or refusal is counted already
        self.bytesEchoed += proto.bytesIn
        self.bytesSent += proto.bytesIn - unsentBytes(proto.transport)
        if proto.peerHost is not None:
            left = self.perPeer.pop(proto.peerHost) - 1
            if left:
                self.perPeer[proto.peerHost] = left
        if self.logClose:
            if proto.via is None:
                self.closeLine(
                    peer=self.peerOf(proto.transport),
                    duration=time.monotonic() - proto.started,
                    bytes=proto.bytesIn,
                    why=proto.closeReason or describeReason(reason),
                )
            else:
                self.closeViaLine(
                    peer=formatAddress(proto.client), via=formatAddress(proto.via),
                    duration=time.monotonic() - proto.started,
                    bytes=proto.bytesIn,
                    why=proto.closeReason or describeReason(reason),
                )

    def whenEmpty(self) -> defer.Deferred[None]:
        """Fires once no connection is open (at once if none is)."""
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._emptyWaiters.append(d)
        return d

    def closeAll(self, why: str) -> int:
        """Abort every open connection, recording C{why}; return how many."""
        open_ = list(self.connections)
        for p in open_:
            p.close(why)
        return len(open_)

    def sweepIdle(self) -> None:
        """
        Close the connections that have had no traffic for C{idleTimeout}.

        Run every fraction of the timeout by the service, instead of a timer
        reset on every message. A connection is busy if it received bytes or
        if its send buffer changed (it sent some) since the last sweep; one
        paused by backpressure, whose client reads nothing, is neither, and
        L{Echo.close} aborts it (loseConnection() would wait for the
        registered producer for ever); an idle one with nothing to send
        gets an orderly close.
        """
        timeout = self.idleTimeout
        if timeout is None:
            return
        now = self.clock.seconds()
        for p in list(self.connections):
            # The ciphertext too under TLS: is anything leaving at all?
            mark = (p.bytesIn, unsentBytes(socketTransport(p.transport)))
            if mark != p.idleMark:
                p.idleMark = mark
                p.idleSince = now
            elif p.idleSince is None:
                p.idleSince = now  # first sweep that saw it: idle from here
            elif now - p.idleSince >= timeout:
                # Nothing left to send: a FIN. Stuck with unsent bytes (or
                # still open a sweep after a FIN): abort.
                p.close("idle timeout", graceful=mark[1] == 0 and not p.closeReason)

    def openBytes(self) -> int:
        """Bytes received so far on the connections still open."""
        return sum(p.bytesIn for p in self.connections)

    def openSentBytes(self) -> int:
        """Bytes sent so far on the connections still open."""
        return sum(p.bytesIn - unsentBytes(p.transport) for p in self.connections)

    @staticmethod
    def peerOf(transport: ITransport | None) -> str:
        assert transport is not None
        return formatAddress(transport.getPeer())


def fileno(transport: Any) -> int:
    """The descriptor under C{transport}, or -1 if it has none."""
    try:
        return int(socketTransport(transport).fileno())
    except (AttributeError, TypeError, ValueError):
        return -1


def describeReason(reason: Failure) -> str:
    """A few words for why a connection ended, for the access log."""
    # isinstance, not Failure.check: check() names every class of the
    # exception's MRO with reflect.qual on each call, which cost about 10 µs
    # per connection under churn, more than the rest of this line.
    if isinstance(reason.value, ConnectionDone):
        return "closed"
    if isinstance(reason.value, ConnectionLost):
        return "lost"
    return reason.getErrorMessage()
