# -*- test-case-name: tests.test_udp -*-
"""
UDP echo (RFC 862, section 2), guarded against reflection and loops.

A UDP echo server answers whoever a datagram claims to come from, and the
source address of a datagram is easy to forge: a spoofed datagram can aim its
echo at a victim, or set two echo servers answering each other for ever
(CERT CA-1996-01). So each datagram passes L{DatagramGuards} before it is
echoed, and a datagram that fails a guard is dropped, never queued:

  - an empty datagram;
  - a source port below 1024 (where other UDP services live; xinetd's
    C{bad_port_check}), unless C{--udp-allow-low-ports};
  - a source port that is one of this process's own UDP listening ports
    (FreeBSD inetd's C{check_loop});
  - a multicast, broadcast or unspecified source address, or port 0 (as
    OpenBSD inetd's C{dg_badinput});
  - over the per-source token bucket (C{--udp-rate} datagrams a second per
    source address, burst as many), or over the global one
    (C{--udp-rate-total}): the inetds have neither.

The per-source buckets live in a table of bounded size (L{maxSources}), in
least-recently-used order, sized so that the entry it evicts has always
refilled to a full bucket: forgetting it changes no decision
(tests/test_udp.py compares it with an unbounded table).

Every check is an integer comparison, a set or dict lookup or a little float
arithmetic: the guards run on every datagram. Each drop is counted by reason
(the C{echoplug_udp_datagrams_dropped} metric) and logged at most once a second
per reason (L{echoplug.factory.RateLimitedLog}).

Listening: L{UDPServerEndpoint} binds a new socket (C{listenUDP}), and
L{AdoptedDatagramEndpoint} serves a socket someone else bound (systemd's
C{ListenDatagram=}, or a parent process; L{bindDatagramSocket} is that
parent's half). Both pass C{maxPacketSize=65535}: Twisted's default of 8192
would truncate larger datagrams silently.
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, fdesc
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, ISystemHandle
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from echoplug._twisted import endpointArguments, systemdDescriptor
from echoplug.factory import RateLimitedLog
from echoplug.service import Listener, reactorName

#: recvfrom() size: no UDP datagram is larger (65,507 bytes of payload over
#: IPv4, 65,527 over IPv6 without jumbograms), so none is truncated.
MAX_DATAGRAM = 65535
#: The per-source table never holds more entries than this (about 35 MiB):
#: above it, an evicted source may get a fresh bucket early (see maxSources).
MAX_SOURCES = 1 << 17
DEFAULT_RATE = 100
DEFAULT_RATE_TOTAL = 10_000

# Drop reasons: the values of the metric's "reason" label.
EMPTY = "empty"
LOW_PORT = "low_port"
OWN_PORT = "own_port"
BAD_SOURCE = "bad_source"
RATE_SOURCE = "rate_source"
RATE_TOTAL = "rate_total"
SEND_FAILED = "send_failed"
REASONS = (EMPTY, LOW_PORT, OWN_PORT, BAD_SOURCE, RATE_SOURCE, RATE_TOTAL, SEND_FAILED)

Address = tuple[str, int]


def badSource(host: str) -> bool:
    """
    True for a source no reply should go to: unspecified (0.0.0.0/8, ::),
    multicast (224.0.0.0/4, ff00::/8), the limited broadcast and the rest of
    240.0.0.0/4, also as IPv4-mapped IPv6 addresses; and anything that is
    not an address at all. Subnet broadcast addresses cannot be told from
    a host's address without the interface's netmask and pass.
    """
    try:
        if ":" not in host:
            packed = socket.inet_pton(socket.AF_INET, host)
        else:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            if packed[0] == 0xFF or not any(packed):
                return True
            if packed[:12] != b"\0" * 10 + b"\xff\xff":
                return False
            packed = packed[12:]  # IPv4-mapped: judge the IPv4 address
    except OSError:
        return True
    return packed[0] == 0 or packed[0] >= 224


def maxSources(rate: float, burst: float, rateTotal: float) -> int:
    """
    The size of the per-source table for these limits.

    A source's bucket is full again C{W = burst / rate} seconds after the
    last datagram it admitted. An entry that is touched (looked up and moved
    to the recent end) has admitted a datagram then, which took a token from
    the global bucket, or had an empty bucket, so admitted one in the W
    seconds before. The global bucket gives out at most C{rateTotal * (1 +
    2W)} tokens in 2W seconds. With more entries than that (and a margin for
    float rounding), the least recently used one was last touched more than
    W seconds ago, its bucket is full, and evicting it forgets nothing.
    """
    window = burst / rate
    return min(MAX_SOURCES, int(rateTotal * (1 + 3 * window)) + 1)


def peerText(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DatagramGuards:
    """
    Decide, for every datagram, whether to echo it, and keep the books.
    One is shared by all the UDP listeners of a process, so the limits and
    the own-port set are the process's.

    @ivar received: datagrams received; C{receivedBytes} their bytes.
    @ivar sent: datagrams echoed (handed to the kernel); C{sentBytes} theirs.
    @ivar dropped: datagrams dropped, by reason (L{REASONS}).
    @ivar ownPorts: the ports of this process's UDP listeners.
    @ivar sources: per source address, C{[tokens, last update]}, least
        recently used first, at most L{maxSources} entries.
    """

    log = Logger(namespace="echoplug")

    def __init__(
        self,
        rate: int = DEFAULT_RATE,
        rateTotal: int = DEFAULT_RATE_TOTAL,
        allowLowPorts: bool = False,
        clock: Any = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.now = now
        self.rate = float(rate)
        self.burst = float(rate)
        self.rateTotal = float(rateTotal)
        self.burstTotal = float(rateTotal)
        self.lowestPort = 1 if allowLowPorts else 1024
        self.maxSources = maxSources(self.rate, self.burst, self.rateTotal)
        self.ownPorts: set[int] = set()
        self.sources: OrderedDict[str, list[float]] = OrderedDict()
        self.totalTokens = self.burstTotal
        self.totalStamp = now()
        self.received = self.receivedBytes = 0
        self.sent = self.sentBytes = 0
        self.dropped = dict.fromkeys(REASONS, 0)
        self.why = {
            EMPTY: "empty datagram",
            LOW_PORT: "source port below 1024 (where other services live)",
            OWN_PORT: "source port is one of echoplug's own UDP ports (a loop?)",
            BAD_SOURCE: "source is multicast, broadcast, unspecified or port 0",
            RATE_SOURCE: f"over --udp-rate {rate} per source",
            RATE_TOTAL: f"over --udp-rate-total {rateTotal}",
            SEND_FAILED: "the echo could not be sent (send buffer full?)",
        }
        self.dropLogs = {
            reason: RateLimitedLog(self.log, clock, f"dropped {{n}} more datagrams: {why}")
            for reason, why in self.why.items()
        }

    def check(self, data: bytes, addr: Address) -> str | None:
        """
        Count the datagram; return C{None} to echo it, or why to drop it.
        """
        self.received += 1
        self.receivedBytes += len(data)
        host, port = addr
        if not data:
            return EMPTY
        if port < self.lowestPort:
            return LOW_PORT if port else BAD_SOURCE
        if port in self.ownPorts:
            return OWN_PORT
        now = self.now()
        total = self.totalTokens + (now - self.totalStamp) * self.rateTotal
        if total > self.burstTotal:
            total = self.burstTotal
        self.totalStamp = now
        self.totalTokens = total
        sources = self.sources
        entry = sources.get(host)
        if entry is None:
            # First sight (or forgotten with a full bucket): judge the
            # address once, and only keep addresses that may be answered.
            if badSource(host):
                return BAD_SOURCE
            if total < 1:
                return RATE_TOTAL
            sources[host] = [self.burst - 1, now]
            if len(sources) > self.maxSources:
                sources.popitem(last=False)
        else:
            tokens = entry[0] + (now - entry[1]) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            entry[0] = tokens
            entry[1] = now
            if total < 1:
                # Not moved to the recent end: it took no token (maxSources).
                return RATE_TOTAL
            sources.move_to_end(host)
            if tokens < 1:
                return RATE_SOURCE
            entry[0] = tokens - 1
        self.totalTokens = total - 1
        return None

    def drop(self, reason: str, addr: Address) -> None:
        """Count a dropped datagram and log it, at most a line a second per reason."""
        self.dropped[reason] += 1
        self.dropLogs[reason]("dropped a datagram from {peer}: {why}{more}",
                              peer=peerText(addr), why=self.why[reason], reason=reason)


class DatagramEcho(DatagramProtocol):
    """
    Send every datagram back to its source, unchanged, if the guards let it.
    One per UDP listener.
    """

    noisy = False  # no "Starting protocol" lines: the listener logs its own.

    def __init__(self, guards: DatagramGuards) -> None:
        self.guards = guards
        self.check = guards.check
        self.drop = guards.drop

    def startProtocol(self) -> None:
        # The socket's own sendto: Twisted's Port.write re-validates the
        # address on every call, and raises EAGAIN out of datagramReceived.
        sock = ISystemHandle(self.transport).getHandle()
        assert isinstance(sock, socket.socket)
        self.sendto = sock.sendto

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        why = self.check(data, addr)
        if why is None:
            self.echo(data, addr)
        else:
            self.drop(why, addr)

    def echo(self, data: bytes, addr: Address) -> None:
        try:
            self.sendto(data, addr)
        except OSError:
            # EAGAIN or ENOBUFS: the kernel has no room. UDP may lose it.
            self.drop(SEND_FAILED, addr)
            return
        guards = self.guards
        guards.sent += 1
        guards.sentBytes += len(data)


class TracingDatagramEcho(DatagramEcho):
    """L{DatagramEcho} that logs every datagram and what became of it (C{--trace})."""

    log = Logger(namespace="echoplug.trace")

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        peer = peerText(addr)
        self.log.info("received {data!r} from {peer}", data=data, peer=peer)
        why = self.check(data, addr)
        if why is None:
            self.log.info("sending {data!r} to {peer}", data=data, peer=peer)
            self.echo(data, addr)
        else:
            self.log.info("dropping the datagram from {peer}: {reason}", peer=peer, reason=why)
            self.drop(why, addr)


class UDPServerEndpoint:
    """Listen for datagrams on a new socket bound to C{interface} and C{port}."""

    def __init__(self, reactor: Any, port: int, interface: str = "127.0.0.1") -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface

    def listen(self, protocol: DatagramProtocol) -> defer.Deferred[IListeningPort]:
        try:
            port = self.reactor.listenUDP(self.port, protocol, self.interface,
                                          maxPacketSize=MAX_DATAGRAM)
        except Exception:
            return defer.fail()
        return defer.succeed(port)


class AdoptedDatagramEndpoint:
    """
    Serve a bound UDP socket that someone else made: systemd's
    C{ListenDatagram=}, or a parent process. Like Twisted's
    C{AdoptedStreamServerEndpoint}, it closes C{fileno} once adopted
    (the reactor keeps a duplicate).
    """

    def __init__(self, reactor: Any, fileno: int, addressFamily: int) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self.addressFamily = addressFamily

    def listen(self, protocol: DatagramProtocol) -> defer.Deferred[IListeningPort]:
        try:
            fdesc.setNonBlocking(self.fileno)
            port = self.reactor.adoptDatagramPort(self.fileno, self.addressFamily, protocol,
                                                  maxPacketSize=MAX_DATAGRAM)
            os.close(self.fileno)
        except Exception:
            return defer.fail()
        return defer.succeed(port)


def bindDatagramSocket(interface: str, port: int) -> socket.socket:
    """
    A bound, non-blocking UDP socket, for a parent process to hand to a
    worker that serves it with L{AdoptedDatagramEndpoint}.
    """
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((interface, port))
    except BaseException:
        sock.close()
        raise
    return sock


class DatagramListener(Listener):
    """
    Serve one UDP endpoint with its own L{DatagramEcho}. A L{Listener}, so
    it binds before privileges drop, a port in use is one line, and
    C{READY=1} waits for it too.
    """

    def __init__(self, description: str, endpoint: UDPServerEndpoint | AdoptedDatagramEndpoint,
                 protocol: DatagramEcho) -> None:
        self.description = description
        self.datagramEndpoint = endpoint
        self.protocol = protocol
        self.port: IListeningPort | None = None
        self.ready: defer.Deferred[IListeningPort] = defer.Deferred()

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        failed: list[Any] = []
        d = self.datagramEndpoint.listen(self.protocol)
        d.addCallbacks(self._listening, failed.append)
        if failed:
            raise SystemExit(f"echoplug: cannot listen on {self.description}: "
                             f"{failed[0].getErrorMessage()}")

    def _listening(self, port: IListeningPort) -> None:
        from twisted.internet import reactor

        self.port = port
        host = port.getHost()
        assert isinstance(host, IPv4Address | IPv6Address)
        self.ownPort = host.port
        self.protocol.guards.ownPorts.add(self.ownPort)
        self.log.info(
            "listening on {address}, reactor={reactor} ({cls}), UDP",
            address=peerText((host.host, host.port)),
            reactor=reactorName(reactor), cls=type(reactor).__name__,
        )
        self.ready.callback(port)

    def stopService(self) -> defer.Deferred[Any] | None:
        Service.stopService(self)
        if self.port is None:
            return None
        port, self.port = self.port, None
        self.protocol.guards.ownPorts.discard(self.ownPort)
        return defer.maybeDeferred(port.stopListening)


# Endpoint descriptions: udp:PORT[:interface=ADDR] and
# systemd-udp:name=NAME or systemd-udp:index=N (optionally :domain=INET/INET6).

PREFIXES = ("udp:", "systemd-udp:")


def isDatagramDescription(description: str) -> bool:
    return description.startswith(PREFIXES)


def datagramEndpoint(reactor: Any, description: str
                     ) -> UDPServerEndpoint | AdoptedDatagramEndpoint:
    """
    The endpoint for a C{udp:} or C{systemd-udp:} description.

    @raise ValueError: with one line saying what is wrong.
    """
    args, kwargs = endpointArguments(description)
    kind, args = args[0], args[1:]
    if kind == "udp":
        return udpEndpoint(reactor, args, kwargs)
    return systemdEndpoint(reactor, args, kwargs)


def udpEndpoint(reactor: Any, args: list[str], kwargs: dict[str, str]) -> UDPServerEndpoint:
    unknown = set(kwargs) - {"port", "interface"}
    if unknown or len(args) + ("port" in kwargs) != 1:
        raise ValueError("expected udp:PORT or udp:PORT:interface=ADDR"
                         + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
    text = args[0] if args else kwargs["port"]
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"{text!r} is not a port number (0 to 65535)")
    interface = kwargs.get("interface", "127.0.0.1")
    if not (isIPAddress(interface) or isIPv6Address(interface)):
        raise ValueError(f"interface {interface!r} is not an IPv4 or IPv6 address "
                         "(escape the colons of IPv6: interface=\\:\\:1)")
    return UDPServerEndpoint(reactor, int(text), interface)


def systemdEndpoint(reactor: Any, args: list[str], kwargs: dict[str, str]
                    ) -> AdoptedDatagramEndpoint:
    """
    Find the socket as Twisted's C{systemd:} endpoint does (the same
    C{LISTEN_FDS}, C{LISTEN_FDNAMES}, read once when Twisted's endpoints
    module is imported), then check that it is a UDP socket.
    """
    from twisted.internet.endpoints import quoteStringArgument

    unknown = set(kwargs) - {"name", "index", "domain"}
    if args or unknown or ("name" in kwargs) == ("index" in kwargs):
        raise ValueError("expected systemd-udp:name=NAME or systemd-udp:index=N")
    domain = kwargs.get("domain")
    if domain not in (None, "INET", "INET6"):
        raise ValueError(f"domain={domain}: choose INET or INET6")
    which = (f"name={quoteStringArgument(kwargs['name'])}" if "name" in kwargs
             else f"index={kwargs['index']}")
    try:
        fileno = systemdDescriptor(reactor, which)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError("no such socket was passed by the service manager "
                         f"(LISTEN_FDS/LISTEN_FDNAMES): {e}") from None
    try:
        sock = socket.socket(fileno=fileno)  # reads the family and type from the kernel
    except OSError as e:
        raise ValueError(f"descriptor {fileno} is not a socket: {e.strerror}") from None
    try:
        family, kind = sock.family, sock.type
    finally:
        sock.detach()
    if kind != socket.SOCK_DGRAM or family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"descriptor {fileno} is not a UDP socket (ListenDatagram=); "
                         "for ListenStream= use systemd:domain=INET:...")
    if domain is not None and family != getattr(socket, f"AF_{domain}"):
        raise ValueError(f"descriptor {fileno} is not domain={domain}")
    return AdoptedDatagramEndpoint(reactor, fileno, family)
