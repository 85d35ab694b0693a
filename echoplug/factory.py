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

import socket
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IReactorTime, ITransport
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from echoplug._twisted import (
    keepaliveInherited,
    listeningSocket,
    socketTransport,
    unsentBytes,
)
from echoplug.buffers import BufferBound
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
    @ivar bytesReceived: bytes received on closed connections (each one was
        echoed back, unless the connection was cut first).
    @ivar refused: connections closed at once, unserved, because of a cap.
    @ivar maxConnections: the cap on open connections, or C{None}.
    @ivar maxPerPeer: the cap on open connections from one IP, or C{None}.
    @ivar perPeer: open connections by peer key (L{peerKey}: the client's
        network), kept only under a per-peer cap.
    @ivar peerPrefix: (IPv4 bits, IPv6 bits): the networks L{peerKey} groups.
    @ivar bound: the bound on bytes held over all connections, or C{None}.
    @ivar keepalive: TCP keepalive for each accepted connection, or C{None}.
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
        maxBuffered: int | None = None,
        keepalive: Keepalive | None = None,
        peerPrefix: tuple[int, int] = (32, 64),
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
        # Its fields (peer, duration, received, sent, why) are documented in
        # docs/operations.md; add fields, but do not rename these.
        self.openLine = LogLine(self.log, LogLevel.debug, "open {peer}")
        self.closeLine = LogLine(
            self.log, LogLevel.info,
            "close {peer} after {duration:.3f}s, "
            "{received} bytes received, {sent} bytes sent, {why}")
        # The same lines for a client named by a PROXY header: its balancer too.
        self.openViaLine = LogLine(self.log, LogLevel.debug, "open {peer} via {via}")
        self.closeViaLine = LogLine(
            self.log, LogLevel.info,
            "close {peer} via {via} after {duration:.3f}s, "
            "{received} bytes received, {sent} bytes sent, {why}")
        self.connections: set[Echo] = set()
        self.accepted = 0
        self.bytesReceived = 0
        self.bytesSent = 0
        self.refused = 0
        self.maxConnections = maxConnections
        self.maxPerPeer = maxPerPeer
        self.perPeer: dict[str, int] = {}
        self.peerPrefix = peerPrefix
        self.keepalive = keepalive
        self.bound = (None if maxBuffered is None
                      else BufferBound(maxBuffered, self.connections, self.clock))
        self.idleTimeout = idleTimeout
        # The idle sweep's buckets: each sweep checks one (see sweepIdle).
        self.idleBuckets: list[set[Echo]] = [set()]
        self.idleGeneration = 0
        self.sweepsPerTimeout = 1
        self._nextBucket = 0
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
            host = self.peerKey(addr)  # None for UNIX sockets: not capped
            if host is not None and self.perPeer.get(host, 0) >= self.maxPerPeer:
                self.refuse(addr, f"at --max-connections-per-peer {self.maxPerPeer} for {host}")
                return None
        p = self.protocol()
        p.factory = self
        if host is not None:
            p.peerHost = host
        return p

    def peerKey(self, addr: IAddress | None) -> str | None:
        """
        What a per-peer cap counts C{addr} under: its network at
        C{peerPrefix} (by default the IPv4 address, or the IPv6 /64 that
        one client may control), or C{None} for a peer with no IP (UNIX).
        Every check of a per-peer cap calls this, wherever the real peer
        becomes known.
        """
        host = getattr(addr, "host", None)
        if host is None:
            return None
        return prefixKey(host, *self.peerPrefix)

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
            host = self.peerKey(addr)  # None for UNIX sockets: not capped
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
        if self.keepalive is not None and not keepaliveInherited(proto.transport):
            self.keepalive.apply(proto.transport)
        if self.bound is not None:
            self.bound.connected(proto)
        if self.idleTimeout is not None:
            self.watchIdle(proto)
        if proto.admitted:  # False until a PROXY header is read: admit()
            self._serve(proto)

    def connectionLost(self, proto: Echo, reason: Failure) -> None:
        if not proto.counted:
            return
        self.connections.discard(proto)
        if proto.held:
            assert self.bound is not None
            self.bound.lost(proto)
        if proto.idleSlot >= 0:
            self.idleBuckets[proto.idleSlot].discard(proto)
        if self._emptyWaiters and not self.connections:
            waiters, self._emptyWaiters = self._emptyWaiters, []
            for d in waiters:
                self.clock.callLater(0, d.callback, None)
        if not proto.admitted:
            return  # never served: its bad header or refusal is counted already
        sent = proto.bytesIn - unsentBytes(proto.transport)
        self.bytesReceived += proto.bytesIn
        self.bytesSent += sent
        if proto.peerHost is not None:
            left = self.perPeer.pop(proto.peerHost) - 1
            if left:
                self.perPeer[proto.peerHost] = left
        if self.logClose:
            fields = {"duration": time.monotonic() - proto.started, "received": proto.bytesIn,
                      "sent": sent, "why": proto.closeReason or describeReason(reason)}
            if proto.via is None:
                self.closeLine(peer=self.peerOf(proto.transport), **fields)
            else:
                self.closeViaLine(peer=formatAddress(proto.client),
                                  via=formatAddress(proto.via), **fields)

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

    def setSweeps(self, sweepsPerTimeout: int) -> None:
        """
        Say how many sweeps run per idle timeout (the service runs them):
        each connection is checked every half timeout, so every sweep
        checks one bucket of C{sweepsPerTimeout // 2}, a share of the
        connections, instead of all of them.
        """
        self.sweepsPerTimeout = max(1, sweepsPerTimeout)
        buckets = max(1, self.sweepsPerTimeout // 2)
        old = [p for bucket in self.idleBuckets for p in bucket]
        self.idleBuckets = [set() for _ in range(buckets)]
        self._nextBucket = 0
        for p in old:
            self._bucket(p)

    def watchIdle(self, proto: Echo) -> None:
        """A new connection: idle from the next sweep on, checked in turn."""
        proto.idleSince = self.idleGeneration + 1
        self._bucket(proto)

    def _bucket(self, proto: Echo) -> None:
        # Round robin keeps the buckets even, whatever the pace of connects.
        slot = self._nextBucket
        self._nextBucket = (slot + 1) % len(self.idleBuckets)
        proto.idleSlot = slot
        self.idleBuckets[slot].add(proto)

    def sweepIdle(self) -> None:
        """
        Close the connections that have had no traffic for C{idleTimeout}.

        Run C{sweepsPerTimeout} times per timeout by the service, instead of
        a timer reset on every message. Each run checks one bucket of
        connections, so each connection is checked every half timeout and a
        sweep costs a share of them (at 15,000 connections and 8 buckets,
        about 1,900). A connection is busy if it received bytes or its send
        buffer changed (it sent some) since its last check: counters the
        protocol and transport keep anyway. One that has been neither for a
        timeout of sweeps is closed, between 1 and 1.5 timeouts after its
        last traffic. One paused by backpressure, whose client reads nothing,
        is neither, and L{Echo.close} aborts it (loseConnection() would wait
        for the registered producer for ever); an idle one with nothing to
        send gets an orderly close.
        """
        if self.idleTimeout is None:
            return
        self.idleGeneration = generation = self.idleGeneration + 1
        bucket = self.idleBuckets[generation % len(self.idleBuckets)]
        due = generation - self.sweepsPerTimeout
        closing = []
        for p in bucket:
            # The ciphertext too under TLS: is anything leaving at all?
            mark = (p.bytesIn, unsentBytes(socketTransport(p.transport)))
            if mark != p.idleMark:
                p.idleMark = mark
                p.idleSince = generation
            elif p.idleSince <= due:
                closing.append(p)
        for p in closing:
            # Nothing left to send: a FIN. Stuck with unsent bytes (or still
            # open a check after a FIN): abort.
            p.close("idle timeout", graceful=p.idleMark[1] == 0 and not p.closeReason)

    @staticmethod
    def peerOf(transport: ITransport | None) -> str:
        assert transport is not None
        return formatAddress(transport.getPeer())


#: --peer-prefix by default: an IPv4 address, or an IPv6 /64 (what one site
#: or one client usually gets).
DEFAULT_PEER_PREFIX = "32,64"


def prefixKey(host: str, v4bits: int = 32, v6bits: int = 64) -> str:
    """
    The network of C{host} at C{v4bits} (IPv4) or C{v6bits} (IPv6), as
    text: C{"192.0.2.7"} for a whole address, C{"192.0.2.0/24"},
    C{"2001:db8:1:2::/64"}. An IPv4-mapped IPv6 address (a dual-stack
    listener's IPv4 client) is taken as the IPv4 address it maps, so that
    all IPv4 clients do not share one /64; a zone (C{%eth0}) is dropped.
    """
    host = host.partition("%")[0]
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host)
        if raw[:12] != b"\0" * 10 + b"\xff\xff":
            n = int.from_bytes(raw, "big")
            if v6bits >= 128:
                return host
            n = n >> (128 - v6bits) << (128 - v6bits)
            net = socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big"))
            return f"{net}/{v6bits}"
        host = socket.inet_ntop(socket.AF_INET, raw[12:])
    if v4bits >= 32:
        return host
    n = int.from_bytes(socket.inet_aton(host), "big") >> (32 - v4bits) << (32 - v4bits)
    return f"{socket.inet_ntoa(n.to_bytes(4, 'big'))}/{v4bits}"


@dataclass(frozen=True)
class Keepalive:
    """
    TCP keepalive for each accepted connection, so that a peer that
    vanished without a FIN or a reset (powered off, cut off by a NAT or a
    firewall) does not hold a connection for ever.

    After C{idle} seconds of silence the kernel sends a probe, then one
    every C{interval} seconds, and gives up after C{count} unanswered:
    C{idle + interval * count} seconds in all. TCP_USER_TIMEOUT is that
    long too: data left unacknowledged (or a zero window that never
    opens) closes the connection after as long, where the kernel would
    otherwise retransmit for about 15 minutes.

    Set once on each TCP listening socket echoplug (or its C{--workers}
    parent) made (L{listen}): Linux copies all five options to every socket
    it accepts there (tests/test_lean.py checks that it does), so such a
    connection costs no system call for them; five per connection were a
    tenth of the CPU of a short one. A systemd socket outlives echoplug and
    keeps its unit's settings: its connections get them one by one
    (L{apply}).
    """

    idle: int
    interval: int
    count: int = 4

    #: Linux's largest TCP_KEEPIDLE.
    MAX_IDLE = 32767

    @classmethod
    def after(cls, idle: int) -> Keepalive:
        """Probe after C{idle} seconds, 4 probes 1/20 of that apart (300: 15 s)."""
        return cls(idle, max(1, idle // 20))

    @property
    def userTimeout(self) -> int:
        """TCP_USER_TIMEOUT, in milliseconds."""
        return (self.idle + self.interval * self.count) * 1000

    def apply(self, transport: Any) -> None:
        """Set the options on the TCP socket under C{transport}; not UNIX."""
        self.setOn(getattr(socketTransport(transport), "socket", None))

    def listen(self, port: Any) -> None:
        """
        Set the options on a listening port's socket, for every connection
        it accepts from now on; not on a UNIX one.
        """
        self.setOn(listeningSocket(port))

    def setOn(self, sock: Any) -> None:
        """Set the options on C{sock} if it is a TCP socket."""
        if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET,
                                                                      socket.AF_INET6):
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, self.interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.count)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.userTimeout)
        except OSError:
            pass  # already reset by the peer: it will be closed anyway


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
