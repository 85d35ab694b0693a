# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd echoplug} command line: L{Options} and L{makeService}, in the
shape of C{twisted/web/tap.py}.

A bare port number means TCP on 127.0.0.1, as the original select() server
bound localhost; anything else is a Twisted server endpoint string
(C{tcp:}, C{tcp6:}, C{unix:}, C{ssl:}, C{systemd:}). UDP is opt-in and
has its own two forms, C{udp:PORT[:interface=ADDR]} (127.0.0.1 unless an
interface is given) and C{systemd-udp:name=NAME} or C{systemd-udp:index=N}
for a systemd C{ListenDatagram=} socket (L{echoplug.udp}).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from echoplug._twisted import endpointArguments
from echoplug.factory import DEFAULT_PEER_PREFIX, PROXY_MODES, EchoFactory, Keepalive
from echoplug.logs import FORMATS, LEVELS, makeObserver, twistdObserver
from echoplug.service import EchoService
from echoplug.workers import loggingProblem, workerCount

if TYPE_CHECKING:
    from echoplug.workers import Arbiter

DEFAULT_PORT = "10000"
#: The listen backlog, as in the shipped socket unit (Backlog=4096); the
#: kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 4096
#: Mode of a UNIX socket's file: owner and group may connect, others not.
DEFAULT_UNIX_MODE = "660"
#: The bound on bytes held in user space for all connections together.
DEFAULT_MAX_BUFFERED = "64M"
#: Seconds of silence before the first keepalive probe (see Keepalive).
DEFAULT_KEEPALIVE = "300"
#: Endpoint types that take backlog= (and, for UNIX, mode=).
BACKLOG_TYPES = frozenset({"TCP", "TCP6", "SSL", "UNIX"})

log = Logger(namespace="echoplug")


def endpointDescription(port: str, option: str = "--port") -> str:
    """
    Turn a C{--port} (or C{--metrics}) value into an endpoint description: a
    bare number is TCP on 127.0.0.1, anything else must already be an
    endpoint string.

    @raise usage.UsageError: for a bad number or something that is neither.
    """
    port = port.strip()
    if port.lstrip("+-").isdigit():
        number = int(port)
        if not 0 <= number <= 65535:
            raise usage.UsageError(f"{option} {port}: a port number is 0 to 65535")
        return f"tcp:{number}:interface=127.0.0.1"
    if ":" not in port:
        raise usage.UsageError(
            f"{option} {port!r}: not a port number or an endpoint (such as tcp:10000)"
        )
    return port


def parseDatagramEndpoint(description: str) -> Any:
    """
    The UDP endpoint for a C{udp:} or C{systemd-udp:} description.

    @raise usage.UsageError: for anything wrong with it, in one line.
    """
    from twisted.internet import reactor

    from echoplug.udp import datagramEndpoint

    try:
        return datagramEndpoint(reactor, description)
    except ValueError as e:
        raise usage.UsageError(f"--port {description}: {e}") from None


def parseEndpoint(description: str, option: str = "--port") -> IStreamServerEndpoint:
    """
    Build the server endpoint for C{description} with the installed reactor
    (twistd installs the one named by C{-r} before it parses plugin options).

    @raise usage.UsageError: for anything Twisted cannot parse, with its
        own words, so a typo is one line and not a traceback.
    """
    from twisted.internet import reactor

    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        return endpoint
    except Exception as e:
        why = str(e) or type(e).__name__
        if description.startswith("systemd:"):
            why = (f"no such socket was passed by the service manager "
                   f"(LISTEN_FDS/LISTEN_FDNAMES): {why}")
        raise usage.UsageError(f"{option} {description}: {why}") from None


def somaxconn() -> int | None:
    """The kernel's cap on a listen backlog (net.core.somaxconn), if known."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def withDefaults(description: str, backlog: int) -> str:
    """
    C{description} with echoplug's defaults for what it leaves out: a
    C{backlog=} for TCP, TLS and UNIX listeners (Twisted's own default is
    50, so a burst of connects waits for SYN retransmits), and C{mode=660}
    for a UNIX socket (Twisted's is 0666: any local user could connect).
    What the description gives is kept; other endpoint types (systemd,
    whose socket is already listening) are left as they are.
    """
    try:
        args, kw = endpointArguments(description)
    except Exception:
        return description  # serverFromString will say what is wrong
    kind = args[0].upper() if args else ""
    if kind not in BACKLOG_TYPES:
        return description
    if "backlog" not in kw:
        description += f":backlog={backlog}"
    if kind == "UNIX" and "mode" not in kw:
        description += f":mode={DEFAULT_UNIX_MODE}"
    return description


SIZE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(option: str, value: str) -> int:
    """
    A number of bytes, with an optional binary suffix: C{65536}, C{64K},
    C{64M}, C{1G} (also C{64MiB}, C{64MB}: all powers of 1024).

    @raise usage.UsageError: for anything else.
    """
    m = SIZE.fullmatch(value.strip())
    if m is None:
        raise usage.UsageError(
            f"{option} {value!r}: not a size in bytes (such as 65536, 64K, 64M or 1G)")
    return int(m[1]) * UNITS[m[2].lower()]


def prefixes(option: str, value: str) -> tuple[int, int]:
    """
    C{V4,V6}: prefix lengths in bits, IPv4 1 to 32, IPv6 1 to 128.

    @raise usage.UsageError: for anything else.
    """
    parts = value.split(",")
    try:
        v4, v6 = (int(part) for part in parts)
    except ValueError:
        raise usage.UsageError(
            f"{option} {value!r}: two prefix lengths, IPv4 then IPv6, such as 32,64") from None
    if not (1 <= v4 <= 32 and 1 <= v6 <= 128):
        raise usage.UsageError(
            f"{option} {value}: IPv4 prefixes are 1 to 32 bits, IPv6 ones 1 to 128")
    return v4, v6


def keepalive(option: str, value: str) -> Keepalive | None:
    """
    Whole seconds of silence before the first keepalive probe, 0 for off.

    @raise usage.UsageError: for anything else.
    """
    try:
        idle = int(value)
    except ValueError:
        raise usage.UsageError(f"{option} {value!r}: not a whole number of seconds") from None
    if not 0 <= idle <= Keepalive.MAX_IDLE:
        raise usage.UsageError(f"{option} {value}: 0 (off) to {Keepalive.MAX_IDLE} seconds")
    return Keepalive.after(idle) if idle else None


def seconds(option: str, value: str) -> float:
    """
    A duration in seconds: a finite number, zero or more.

    @raise usage.UsageError: for anything else.
    """
    try:
        number = float(value)
    except ValueError:
        raise usage.UsageError(f"{option} {value!r}: not a number of seconds") from None
    if not 0 <= number < float("inf"):
        raise usage.UsageError(f"{option} {value}: a number of seconds, 0 or more")
    return number


def positive(option: str, value: str) -> int:
    """
    A cap: a whole number, 1 or more.

    @raise usage.UsageError: for anything else.
    """
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"{option} {value!r}: not a whole number") from None
    if number < 1:
        raise usage.UsageError(f"{option} {value}: must be 1 or more")
    return number


class Options(usage.Options):
    """
    Options of the C{twistd echoplug} plugin.
    """

    synopsis = "[options]"
    longdesc = (
        "Echo every byte back to its sender (RFC 862), at the pace the sender "
        "reads, and finish the echo after a half-close."
    )
    optParameters = [
        ["log-level", None, None, "Log only at this level or above: "
         + ", ".join(LEVELS) + ". [default: info]"],
        ["metrics", None, None, "Serve Prometheus metrics over HTTP at /metrics on this "
         "endpoint, such as tcp:9100:interface=127.0.0.1 (a bare number is TCP on "
         "127.0.0.1). Needs prometheus_client (the metrics extra). [default: off]"],
        ["log-format", None, None, "Log plain text lines (text) or one JSON object per "
         "line (json), where twistd would log: stdout under -n, or -l FILE (rotated on "
         "SIGUSR1). [default: text]"],
        ["idle-timeout", None, None, "Close a connection after this many seconds "
         "with no traffic either way, even one paused because its client stopped "
         "reading. 0: never. [default: 0]"],
        ["max-connections", None, None, "Serve at most N connections at once; more "
         "are closed at once, unserved. [default: what the descriptor limit allows; "
         "960 under -r select]"],
        ["max-connections-per-peer", None, None, "Serve at most N connections at once "
         "from one client IP. [default: no cap]"],
        ["drain-timeout", None, "5", "On SIGTERM, stop listening and give open "
         "connections this many seconds to finish, then close them."],
        ["max-buffered", None, DEFAULT_MAX_BUFFERED, "Hold at most about this many "
         "bytes waiting to be echoed, over all connections (suffixes K, M, G); past it, "
         "connections with unsent bytes stop reading until they drain. 0: no bound."],
        ["backlog", None, None, "Listen backlog of each TCP, TLS and UNIX listener "
         "without a backlog= of its own. [default: 4096, or net.core.somaxconn if lower]"],
        ["keepalive", None, DEFAULT_KEEPALIVE, "Probe a TCP connection after this many "
         "seconds of silence and close it if its peer is gone (4 probes, 1/20 of this "
         "apart; unacknowledged data for as long closes it too). 0: off."],
        ["peer-prefix", None, DEFAULT_PEER_PREFIX, "V4,V6: --max-connections-per-peer "
         "counts the clients of one IPv4 /V4 or IPv6 /V6 network as one peer."],
        ["udp-rate", None, None, "Echo at most N datagrams a second to one source "
         "address (bursts of up to N); drop the rest. [default: 100]"],
        ["udp-rate-total", None, None, "Echo at most N datagrams a second in all "
         "(bursts of up to N); drop the rest. [default: 10000]"],
        ["workers", None, "1", "Serve with N worker processes sharing the listeners "
         "(auto: one per core). 1 is a single process. The caps (--max-connections, "
         "--max-connections-per-peer, --max-buffered) and the UDP rates (--udp-rate, "
         "--udp-rate-total) apply per worker. Needs twistd -n without --logfile, "
         "or --syslog."],
        # Hidden (see getUsage): given by a --workers parent to each worker.
        ["worker", None, None, "N,PARENT_PID: run as worker N of that parent."],
        ["proxy-protocol", None, "off", "Expect a PROXY protocol header (v1 or v2, as "
         "HAProxy, nginx, AWS NLB and Envoy send) on every TCP and UNIX listener: "
         "required (close a connection without one), optional (serve one without it "
         "as plain echo) or off. The client it names is the peer everywhere. Trust: "
         "anyone who can connect can claim any address, so let only the balancer "
         "reach such a listener."],
        ["proxy-timeout", None, "5", "Close a connection that has not sent its whole "
         "PROXY header within this many seconds. 0: never."],
    ]
    optFlags = [
        ["trace", None, "Log every event (connection, data received and sent, closing), "
         "like the original select() server. Slow: for debugging only."],
        ["udp-allow-low-ports", None, "Echo datagrams from source ports below 1024 "
         "too (dropped by default: other UDP services live there). For labs."],
    ]
    compData = usage.Completions(
        optActions={
            "log-level": usage.CompleteList(list(LEVELS)),
            "log-format": usage.CompleteList(list(FORMATS)),
            "proxy-protocol": usage.CompleteList(list(PROXY_MODES)),
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self["ports"] = []

    #: Options for echoplug's own use, left out of --help.
    hidden = ("worker",)

    def getUsage(self, width: int | None = None) -> str:
        shown = self.longOpt
        self.longOpt = [o for o in shown if o.rstrip("=") not in self.hidden]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = shown

    def opt_port(self, port: str) -> None:
        """Listen here; repeatable. A bare number is TCP on 127.0.0.1, else an endpoint such as tcp:10000:interface=0.0.0.0, tcp6:10000, unix:/run/echo.sock, systemd:domain=INET:name=echoplug; UDP: udp:10000 (127.0.0.1), udp:10000:interface=\\:\\:1, systemd-udp:name=echoplug-udp. [default: 10000]"""  # noqa: E501
        self["ports"].append(endpointDescription(port))

    opt_p = opt_port

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # twistd answers a UsageError with its whole usage text; a mistake on
        # the command line deserves one line on stderr and a non-zero exit.
        # The arguments as given: a --workers parent gives them to its workers.
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd echoplug: {e} (see twistd echoplug --help)") from None

    def postOptions(self) -> None:
        # Only when asked for does echoplug replace twistd's log observer.
        self["own-log"] = self["log-level"] is not None or self["log-format"] is not None
        self["log-level"] = self["log-level"] or "info"
        self["log-format"] = self["log-format"] or "text"
        if self["log-level"] not in LEVELS:
            raise usage.UsageError(
                f"--log-level {self['log-level']!r}: choose one of {', '.join(LEVELS)}"
            )
        if self["log-format"] not in FORMATS:
            raise usage.UsageError(
                f"--log-format {self['log-format']!r}: choose one of {', '.join(FORMATS)}"
            )
        self["idle-timeout"] = seconds("--idle-timeout", self["idle-timeout"] or "0") or None
        self["drain-timeout"] = seconds("--drain-timeout", self["drain-timeout"])
        self["proxy-timeout"] = seconds("--proxy-timeout", self["proxy-timeout"])
        if self["proxy-protocol"] not in PROXY_MODES:
            raise usage.UsageError(f"--proxy-protocol {self['proxy-protocol']!r}: choose one "
                                   f"of {', '.join(PROXY_MODES)}")
        for cap in ("max-connections", "max-connections-per-peer", "udp-rate",
                    "udp-rate-total"):
            if self[cap] is not None:
                self[cap] = positive(f"--{cap}", self[cap])
        self["max-buffered"] = size("--max-buffered", self["max-buffered"]) or None
        self["keepalive"] = keepalive("--keepalive", self["keepalive"])
        self["peer-prefix"] = prefixes("--peer-prefix", self["peer-prefix"])
        try:
            self["workers"] = workerCount(self["workers"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        kernelCap = somaxconn()
        if self["backlog"] is None:
            self["backlog"] = min(DEFAULT_BACKLOG, kernelCap or DEFAULT_BACKLOG)
        else:
            self["backlog"] = positive("--backlog", self["backlog"])
            if kernelCap is not None and self["backlog"] > kernelCap and self["worker"] is None:
                log.warn("--backlog {asked}: the kernel caps it at {cap} (net.core.somaxconn)",
                         asked=self["backlog"], cap=kernelCap)
        if not self["ports"]:
            self["ports"] = [endpointDescription(DEFAULT_PORT)]
        if self["proxy-protocol"] != "off":
            for d in self["ports"]:
                if d.startswith(("ssl:", "tls:")):
                    # The header comes before the TLS handshake, but TLS wraps
                    # the echo protocol: the header would reach OpenSSL.
                    raise usage.UsageError(f"--proxy-protocol does not work with TLS "
                                           f"listeners ({d}): let the balancer end TLS")
        from echoplug.udp import DEFAULT_RATE, DEFAULT_RATE_TOTAL, isDatagramDescription

        self["udp-rate"] = self["udp-rate"] or DEFAULT_RATE
        self["udp-rate-total"] = self["udp-rate-total"] or DEFAULT_RATE_TOTAL
        streams = [d for d in self["ports"] if not isDatagramDescription(d)]
        datagrams = [d for d in self["ports"] if isDatagramDescription(d)]
        if self["worker"] is not None:
            # A worker binds nothing: it adopts the parent's sockets (and
            # sees no LISTEN_FDS); only a TLS port's endpoint, for its
            # context factory, is needed.
            self["endpoints"] = [
                (d, parseEndpoint(withDefaults(d, self["backlog"])) if d.startswith("ssl:")
                 else None) for d in streams]
            self["datagram-endpoints"] = [(d, None) for d in datagrams]
            return
        if self["workers"] > 1:
            problem = loggingProblem(getattr(self, "parent", None))
            if problem is not None:
                raise usage.UsageError(problem)
        self["endpoints"] = [(d, parseEndpoint(withDefaults(d, self["backlog"])))
                             for d in streams]
        self["datagram-endpoints"] = [(d, parseDatagramEndpoint(d)) for d in datagrams]
        if self["metrics"] is not None:
            self["metrics"] = endpointDescription(self["metrics"], "--metrics")
            try:
                # Only now, and only here: never from the dropin.
                import prometheus_client  # noqa: F401
            except ImportError:
                raise usage.UsageError(
                    "--metrics needs prometheus_client: pip install 'echoplug[metrics]'"
                ) from None
            self["metrics-endpoint"] = parseEndpoint(self["metrics"], "--metrics")

    def opt_version(self) -> None:
        """Print echoplug's version and exit."""
        from echoplug import __version__

        print(f"echoplug {__version__}")
        raise SystemExit(0)


def makeFactory(config: Options, cls: type[EchoFactory] = EchoFactory) -> EchoFactory:
    return cls(
        trace=config["trace"],
        logLevel=config["log-level"],
        maxConnections=config["max-connections"],
        maxPerPeer=config["max-connections-per-peer"],
        idleTimeout=config["idle-timeout"],
        maxBuffered=config["max-buffered"],
        keepalive=config["keepalive"],
        peerPrefix=config["peer-prefix"],
        proxyProtocol=config["proxy-protocol"],
        proxyTimeout=config["proxy-timeout"],
    )


def makeService(config: Options) -> IService:
    """
    Build the echoplug service: one factory shared by a listener per
    C{--port}; or, for C{--workers} N > 1, the parent of N such processes
    (L{echoplug.workers}); or, with the hidden C{--worker}, one of them.
    """
    if config["worker"] is not None:
        from echoplug.worker import WorkerFactory, makeWorkerService

        factory = makeFactory(config, WorkerFactory)
        assert isinstance(factory, WorkerFactory)
        return cast(IService, makeWorkerService(config, factory, logObserver(config)))
    service: EchoService | Arbiter
    guards = None
    if config["workers"] > 1:
        from echoplug.workers import makeArbiter

        service = makeArbiter(config, logObserver(config))
        if config["datagram-endpoints"]:
            from echoplug.books import DatagramTotals

            guards = DatagramTotals(service.books)
    else:
        service = EchoService(makeFactory(config), logObserver=logObserver(config),
                              drainTimeout=config["drain-timeout"])
        for description, endpoint in config["endpoints"]:
            service.listen(description, endpoint)
        if config["datagram-endpoints"]:
            guards = listenDatagrams(config, service)
    if config["metrics"] is not None:
        from twisted.internet import reactor

        from echoplug.metrics import MetricsListener, makeSite

        collectors = []
        if not isinstance(service, EchoService):
            from echoplug.metrics import WorkersCollector

            collectors.append(WorkersCollector(service))
        MetricsListener(f"--metrics {config['metrics']}", config["metrics-endpoint"],
                        makeSite(service.factory, reactor, guards,
                                 collectors)).setServiceParent(service)
    # Last, so that it is stopped first: STOPPING=1 as shutdown begins.
    notifier = notifierFor(service)
    if notifier is not None:
        notifier.setServiceParent(service)
    return cast(IService, service)


def listenDatagrams(config: Options, service: Any,
                    endpoints: Sequence[tuple[str, Any]] | None = None) -> Any:
    """
    A UDP listener per C{udp:} or C{systemd-udp:} port (or per one of
    C{endpoints}: a worker's adopted ones), sharing one set of guards
    (limits, own ports, counters); return the guards.
    """
    from echoplug.udp import DatagramEcho, DatagramGuards, DatagramListener, TracingDatagramEcho

    guards = DatagramGuards(rate=config["udp-rate"], rateTotal=config["udp-rate-total"],
                            allowLowPorts=config["udp-allow-low-ports"])
    protocol = TracingDatagramEcho if config["trace"] else DatagramEcho
    if endpoints is None:
        endpoints = config["datagram-endpoints"]
    for description, endpoint in endpoints:
        DatagramListener(description, endpoint, protocol(guards)).setServiceParent(service)
    return guards


def logObserver(config: Options) -> ILogObserver | None:
    """
    What echoplug logs to, or C{None} to leave it to twistd.

    Under twistd, C{config.parent} is twistd's own options: the log goes
    where twistd would send it (see L{twistdObserver}), through echoplug's
    cheaper text observer. Without twistd (tests, a .tac), only
    C{--log-level} and C{--log-format} install an observer, on stdout.
    """
    twistdOptions = getattr(config, "parent", None)
    if twistdOptions is not None:
        level = config["log-level"] if config["own-log"] else None
        return twistdObserver(twistdOptions, config["log-format"], level)
    if config["own-log"]:
        return makeObserver(config["log-format"], config["log-level"])
    return None


def notifierFor(service: EchoService | Arbiter) -> IService | None:
    """
    A L{SystemdNotifier} for C{service} when C{NOTIFY_SOCKET} is set (under
    systemd with C{Type=notify}), else C{None}; an unusable address is one
    line and a non-zero exit, not a unit stuck waiting for C{READY=1}.
    """
    from echoplug.notify import NotifyError, SystemdNotifier

    cls = SystemdNotifier
    if not isinstance(service, EchoService):
        from echoplug.workers import WorkersNotifier

        cls = WorkersNotifier
    try:
        return cls.fromEnvironment(service)  # type: ignore[arg-type]
    except NotifyError as e:
        raise SystemExit(f"echoplug: {e}") from None
