# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd echoplug} command line: L{Options} and L{makeService}, in the
shape of C{twisted/web/tap.py}.

A bare port number means TCP on 127.0.0.1, as the original select() server
bound localhost; anything else is a Twisted server endpoint string
(C{tcp:}, C{tcp6:}, C{unix:}, C{ssl:}, C{systemd:}).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver
from twisted.python import usage

from echoplug.factory import PROXY_MODES, EchoFactory
from echoplug.logs import FORMATS, LEVELS, makeObserver, twistdObserver
from echoplug.service import EchoService
from echoplug.workers import loggingProblem, workerCount

if TYPE_CHECKING:
    from echoplug.workers import Arbiter

DEFAULT_PORT = "10000"


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
         "line (json), to stdout. Given either, echoplug owns the log and twistd's "
         "--logfile is not used. [default: text]"],
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
        ["workers", None, "1", "Serve with N worker processes sharing the listeners "
         "(auto: one per core). 1 is a single process. The caps (--max-connections, "
         "--max-connections-per-peer) apply per worker. Needs twistd -n without "
         "--logfile, or --syslog."],
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
        """Listen here; repeatable. A bare number is TCP on 127.0.0.1, else an endpoint such as tcp:10000:interface=0.0.0.0, tcp6:10000, unix:/run/echo.sock, systemd:domain=INET:name=echoplug. [default: 10000]"""  # noqa: E501
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
        for cap in ("max-connections", "max-connections-per-peer"):
            if self[cap] is not None:
                self[cap] = positive(f"--{cap}", self[cap])
        try:
            self["workers"] = workerCount(self["workers"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if not self["ports"]:
            self["ports"] = [endpointDescription(DEFAULT_PORT)]
        if self["proxy-protocol"] != "off":
            for d in self["ports"]:
                if d.startswith(("ssl:", "tls:")):
                    # The header comes before the TLS handshake, but TLS wraps
                    # the echo protocol: the header would reach OpenSSL.
                    raise usage.UsageError(f"--proxy-protocol does not work with TLS "
                                           f"listeners ({d}): let the balancer end TLS")
        if self["worker"] is not None:
            # A worker binds nothing: it adopts the parent's sockets (and
            # sees no LISTEN_FDS); only a TLS port's endpoint, for its
            # context factory, is needed.
            self["endpoints"] = [(d, parseEndpoint(d) if d.startswith("ssl:") else None)
                                 for d in self["ports"]]
            return
        if self["workers"] > 1:
            problem = loggingProblem(getattr(self, "parent", None))
            if problem is not None:
                raise usage.UsageError(problem)
        self["endpoints"] = [(d, parseEndpoint(d)) for d in self["ports"]]
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
    if config["workers"] > 1:
        from echoplug.workers import makeArbiter

        service = makeArbiter(config, logObserver(config))
    else:
        service = EchoService(makeFactory(config), logObserver=logObserver(config),
                              drainTimeout=config["drain-timeout"])
        for description, endpoint in config["endpoints"]:
            service.listen(description, endpoint)
    if config["metrics"] is not None:
        from twisted.internet import reactor

        from echoplug.metrics import MetricsListener, makeSite

        collectors = []
        if not isinstance(service, EchoService):
            from echoplug.metrics import WorkersCollector

            collectors.append(WorkersCollector(service))
        MetricsListener(f"--metrics {config['metrics']}", config["metrics-endpoint"],
                        makeSite(service.factory, reactor, *collectors)).setServiceParent(service)
    # Last, so that it is stopped first: STOPPING=1 as shutdown begins.
    notifier = notifierFor(service)
    if notifier is not None:
        notifier.setServiceParent(service)
    return cast(IService, service)


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
