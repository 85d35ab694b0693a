# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: a parent process (the arbiter) and N worker processes that
share its listening sockets, so that echoplug uses N cores.

The parent:

  - binds every C{--port} in C{privilegedStartService}, before twistd drops
    privileges, through the same endpoints as a single echoplug (TCP, UNIX,
    TLS, sockets passed by systemd), and never accepts on them: it stops
    reading each port at once and hands its descriptor to the workers;
  - starts each worker with C{reactor.spawnProcess}: the same interpreter,
    C{twistd -n --pidfile=} with the parent's C{-r} reactor and the parent's
    own echoplug options, plus C{--worker N,PARENT_PID}; C{childFDs} carries
    exactly the descriptors of L{echoplug.worker}'s layout, and every other
    descriptor of the parent is closed in the child;
  - restarts a worker that dies, with a backoff while it keeps dying
    (L{RESTART}); logs each death in one line with its exit status;
  - on SIGTERM, sends SIGTERM to every worker at once (each stops listening
    and drains, C{--drain-timeout}), and exits when all have exited: never
    later than the drain timeout plus a second (stragglers get SIGKILL); a
    second SIGTERM is passed on and ends the drains at once;
  - serves C{--metrics} for all workers (L{echoplug.books.Totals}) and tells
    systemd C{READY=1} once every worker listens (L{WorkersNotifier}).

Workers log to the parent's stdout and stderr, which they inherit: each
line is one write, so lines of different workers never mix. That is why
C{--workers} wants C{twistd -n} without C{--logfile} (or C{--syslog}): a log
file that twistd rotates has one owner.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from echoplug import _twisted
from echoplug.books import Books, Totals
from echoplug.factory import EchoFactory
from echoplug.notify import SystemdNotifier
from echoplug.service import Listener, reactorName
from echoplug.worker import BOOKS, FIRST_PORT, LIFELINE, REPORT

#: Seconds before restarting a worker that died for the Nth time in a row:
#: 0.1 s, doubling to at most 30 s, plus up to 0.1 s of jitter so that
#: workers that died together do not restart together.
RESTART = backoffPolicy(initialDelay=0.1, maxDelay=30.0, factor=2.0,
                        jitter=lambda: random.random() * 0.1)
#: A worker that listened this many seconds before dying died "once", not
#: "again": its backoff starts over.
STABLE = 5.0
#: After the drain timeout, seconds a worker gets to exit before SIGKILL.
GRACE = 0.7
#: The environment a worker must not see: the sockets passed by systemd
#: (the parent adopted them) and the notification socket (the parent
#: speaks for the workers).
PARENT_ONLY = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
               "WATCHDOG_USEC", "WATCHDOG_PID")
#: twistd from this interpreter, its argv[0] set as the script's would be.
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def workerCount(value: str) -> int:
    """
    C{--workers}: a whole number, 1 or more, or C{auto} for one per core
    this process may run on.

    @raise ValueError: with one line for anything else.
    """
    value = value.strip()
    if value == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            return os.cpu_count() or 1
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"--workers {value!r}: a whole number or auto") from None
    if number < 1:
        raise ValueError(f"--workers {value}: must be 1 or more (or auto)")
    return number


def loggingProblem(twistdOptions: Mapping[str, Any] | None) -> str | None:
    """Why twistd's logging options do not suit workers, or C{None}."""
    if twistdOptions is None or twistdOptions.get("syslog") or twistdOptions.get("logger"):
        return None
    logfile = twistdOptions.get("logfile")
    if not twistdOptions.get("nodaemon"):
        return "--workers needs twistd -n (--nodaemon): workers log to the parent's stdout"
    if logfile not in (None, "", "-"):
        return (f"--workers cannot log to --logfile {logfile}: workers write to the "
                "parent's stdout (run under -n, or use --syslog)")
    return None


def twistdArguments(twistdOptions: Mapping[str, Any] | None, reactor: Any) -> list[str]:
    """
    The twistd options of a worker: in the foreground, no pid file, the
    parent's reactor, and the parent's choice of syslog or logger.
    """
    args = ["-n", "--pidfile="]
    options = twistdOptions or {}
    name = options.get("reactor") or reactorName(reactor)
    if name != type(reactor).__name__:  # a name twistd -r knows
        args += ["-r", name]
    if options.get("syslog"):
        args += ["--syslog", "--prefix", options.get("prefix") or "twisted"]
    if options.get("logger"):
        args += ["--logger", options["logger"]]
    return args


def workerEnvironment(environ: Mapping[str, str]) -> dict[str, str]:
    """
    The parent's environment without L{PARENT_ONLY}, and with the echoplug
    that runs in the parent first on C{PYTHONPATH}, so that every worker
    runs the same code (a checkout, or the installed package).
    """
    import echoplug

    env = {k: v for k, v in environ.items() if k not in PARENT_ONLY}
    root = os.path.dirname(os.path.dirname(os.path.abspath(echoplug.__file__)))
    paths = [root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def describeEnd(reason: Failure) -> str:
    """How a process ended, in a few words: its exit status or signal."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig == signal.SIGTERM:
            return "stopped (SIGTERM)"  # twistd re-raises it after a clean stop
        return f"killed by signal {sig} ({name})"
    return f"exited with status {getattr(value, 'exitCode', 0) or 0}"


class SharedListener(Listener):
    """
    Bind one C{--port} for the workers: listen through its endpoint as a
    single echoplug would, then stop reading it, so that the parent never
    accepts a connection; the workers accept on its descriptor.
    """

    def _listening(self, port: IListeningPort) -> None:
        port.stopReading()  # type: ignore[attr-defined]
        super()._listening(port)

    def stopService(self) -> defer.Deferred[Any] | None:
        Service.stopService(self)
        if self.port is None:
            return None
        port, self.port = self.port, None
        # Close the parent's copy; the workers close theirs as they stop.
        return defer.maybeDeferred(_twisted.stopWithoutShutdown, port)

    def fileno(self) -> int:
        assert self.port is not None
        return int(self.port.fileno())  # type: ignore[attr-defined]


class SharedDatagramSocket(Service):
    """
    Bind one C{udp:} or C{systemd-udp:} port for the workers: a C{udp:}
    socket bound here (L{echoplug.udp.bindDatagramSocket}), before
    privileges drop, or the socket systemd passed. The parent never reads
    it; each worker serves its descriptor (L{echoplug.udp.AdoptedDatagramEndpoint}).
    """

    def __init__(self, description: str, endpoint: Any) -> None:
        self.description = description
        self.endpoint = endpoint
        self.sock: Any = None
        self.ready: defer.Deferred[Any] = defer.Deferred()

    def privilegedStartService(self) -> None:
        import socket

        from echoplug.udp import UDPServerEndpoint, bindDatagramSocket

        super().privilegedStartService()
        if self.sock is not None:
            return
        try:
            if isinstance(self.endpoint, UDPServerEndpoint):
                self.sock = bindDatagramSocket(self.endpoint.interface, self.endpoint.port)
            else:  # systemd's: keep it open, the same descriptor
                self.sock = socket.socket(fileno=self.endpoint.fileno)
        except OSError as e:
            raise SystemExit(f"echoplug: cannot listen on {self.description}: "
                             f"{e.strerror or e}") from None
        self.ready.callback(self.sock)

    def startService(self) -> None:
        if self.sock is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def fileno(self) -> int:
        assert self.sock is not None
        return int(self.sock.fileno())


class WorkerProcess(ProcessProtocol):
    """The parent's end of one worker process."""

    transport: Any

    def __init__(self, arbiter: Arbiter, number: int) -> None:
        self.arbiter = arbiter
        self.number = number
        self.pid: int | None = None
        self.listening = False
        self.listeningSince: float | None = None
        self.ended = False
        self._buffer = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != REPORT:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if b"listening" in lines and not self.listening:
            self.listening = True
            self.listeningSince = time.monotonic()
            self.arbiter.workerListening(self)

    def signal(self, name: str) -> None:
        if self.ended:
            return
        try:
            self.transport.signalProcess(name)
        except (error.ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.arbiter.workerEnded(self, reason)


class Arbiter(MultiService):
    """
    The parent of C{--workers N}: see the module docstring.

    @ivar factory: the summed books of every worker (L{Totals}), read by
        --metrics and the systemd status line as a single echoplug's factory.
    """

    log = Logger()

    def __init__(self, count: int, argv: list[str], environ: Mapping[str, str],
                 drainTimeout: float = 5.0, logObserver: ILogObserver | None = None,
                 reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.count = count
        self.argv = argv
        self.environ = dict(environ)
        self.drainTimeout = drainTimeout
        self.logObserver = logObserver
        self.books = Books(count)
        self.factory = Totals(self.books)
        self.workers: dict[int, WorkerProcess] = {}
        self.failures = dict.fromkeys(range(1, count + 1), 0)
        self.restarts = dict.fromkeys(range(1, count + 1), 0)
        self.stopping = False
        self._restartCalls: dict[int, Any] = {}
        self._allListening: defer.Deferred[list[int]] = defer.Deferred()
        self._allEnded: defer.Deferred[None] | None = None
        self._killCall: Any = None

    def setServiceParent(self, parent: Any) -> None:
        # As EchoService: twistd starts logging to the application's
        # ILogObserver component, the one hook a plugin has.
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def listen(self, description: str, endpoint: Any) -> SharedListener:
        listener = SharedListener(description, endpoint, EchoFactory())
        listener.setServiceParent(self)
        return listener

    def listenDatagrams(self, description: str, endpoint: Any) -> SharedDatagramSocket:
        shared = SharedDatagramSocket(description, endpoint)
        shared.setServiceParent(self)
        return shared

    @property
    def listeners(self) -> list[Listener]:
        return [s for s in self if isinstance(s, Listener)]

    @property
    def datagramSockets(self) -> list[SharedDatagramSocket]:
        return [s for s in self if isinstance(s, SharedDatagramSocket)]

    def whenListening(self) -> defer.Deferred[Any]:
        """Fires once the parent's ports are bound and every worker accepts."""
        return defer.gatherResults(
            [listener.ready for listener in self.listeners]
            + [shared.ready for shared in self.datagramSockets] + [self._allListening])

    def allAlive(self) -> bool:
        """Every worker is running and accepting."""
        live = [w for w in self.workers.values() if w.listening and not w.ended]
        return len(live) == self.count

    def startService(self) -> None:
        super().startService()
        self._ignoreReloadSignals()
        for number in range(1, self.count + 1):
            self.spawn(number)

    def _ignoreReloadSignals(self) -> None:
        """
        SIGHUP and SIGUSR1 would end the parent by default and, through
        it, every worker, without a word: say so and carry on instead.
        (twistd's own SIGUSR1 handler, for --logfile rotation, is kept.)
        """
        def ignored(number: int, frame: object) -> None:
            name = signal.Signals(number).name
            self.reactor.callFromThread(
                self.log.warn, "{signal} ignored: echoplug has no reload; SIGTERM stops it",
                signal=name)

        for sig in (signal.SIGHUP, signal.SIGUSR1):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, ignored)

    def spawn(self, number: int) -> None:
        self._restartCalls.pop(number, None)
        if self.stopping:
            return
        proto = WorkerProcess(self, number)
        fds: dict[int, Any] = {LIFELINE: "w", 1: 1, 2: 2, REPORT: "r", BOOKS: self.books.fd}
        streams = [listener for listener in self.listeners
                   if isinstance(listener, SharedListener)]
        for i, listener in enumerate(streams):
            fds[FIRST_PORT + i] = listener.fileno()
        # The UDP sockets follow the stream ones, in --port order.
        for i, shared in enumerate(self.datagramSockets):
            fds[FIRST_PORT + len(streams) + i] = shared.fileno()
        argv = [sys.executable, "-P", "-c", TWISTD, *self.argv,
                "--worker", f"{number},{os.getpid()}"]
        self.reactor.spawnProcess(proto, sys.executable, argv, env=self.environ,
                                  path=os.getcwd(), childFDs=fds)
        self.workers[number] = proto
        self.log.info("worker {worker} started, pid {pid}", worker=number, pid=proto.pid)

    def workerListening(self, proto: WorkerProcess) -> None:
        self.log.info("worker {worker} (pid {pid}) listening", worker=proto.number,
                      pid=proto.pid)
        if not self._allListening.called and self.allAlive():
            pids = [self.workers[n].pid for n in sorted(self.workers)]
            self.log.info("all {count} workers listening (pids {pids})", count=self.count,
                          pids=", ".join(str(p) for p in pids))
            self._allListening.callback(sorted(self.workers))

    def workerEnded(self, proto: WorkerProcess, reason: Failure) -> None:
        number = proto.number
        if self.workers.get(number) is proto:
            self.books.retire(number - 1)
        if self.stopping:
            self.log.info("worker {worker} (pid {pid}) {how}", worker=number, pid=proto.pid,
                          how=describeEnd(reason))
            if all(w.ended for w in self.workers.values()):
                self._ended()
            return
        lived = (time.monotonic() - proto.listeningSince
                 if proto.listeningSince is not None else 0.0)
        if lived >= STABLE:
            self.failures[number] = 0
        delay = RESTART(self.failures[number])
        self.failures[number] += 1
        self.restarts[number] += 1
        self.log.warn("worker {worker} (pid {pid}) {how}; restarting it in {delay:.1f}s",
                      worker=number, pid=proto.pid, how=describeEnd(reason), delay=delay)
        self._restartCalls[number] = self.reactor.callLater(delay, self.spawn, number)

    def stopService(self) -> defer.Deferred[None]:
        """
        SIGTERM every worker at once, close the parent's copies of the
        listening sockets, and fire when every worker has exited: SIGKILL
        for any still there at the drain timeout plus L{GRACE}.
        """
        if self._allEnded is not None:
            return self._allEnded
        self.stopping = True
        self._allEnded = defer.Deferred()
        for call in self._restartCalls.values():
            if call.active():
                call.cancel()
        self._restartCalls.clear()
        self._hurryOnSignals()
        for proto in self.workers.values():
            proto.signal("TERM")
        stopped = super().stopService()
        stopped.addErrback(lambda f: self.log.failure("while stopping listeners", f))
        if all(w.ended for w in self.workers.values()):
            self._ended()
        else:
            self._killCall = self.reactor.callLater(self.drainTimeout + GRACE, self._kill)
        return defer.gatherResults([stopped, self._allEnded]).addCallback(lambda _: None)

    def _kill(self) -> None:
        self._killCall = None
        for proto in self.workers.values():
            if not proto.ended:
                self.log.warn("worker {worker} (pid {pid}) still running after the drain: "
                              "SIGKILL", worker=proto.number, pid=proto.pid)
                proto.signal("KILL")

    def _ended(self) -> None:
        if self._killCall is not None and self._killCall.active():
            self._killCall.cancel()
        self._killCall = None
        d = self._allEnded
        if d is not None and not d.called:
            d.callback(None)

    def _hurryOnSignals(self) -> None:
        """A second SIGTERM or SIGINT is passed on: every drain ends at once."""
        def hurry(number: int, frame: object) -> None:
            self.reactor.callFromThread(self._passOn)

        for sig, theirs in ((signal.SIGTERM, "sigTerm"), (signal.SIGINT, "sigInt")):
            if signal.getsignal(sig) == getattr(self.reactor, theirs, None):
                signal.signal(sig, hurry)

    def _passOn(self) -> None:
        for proto in self.workers.values():
            proto.signal("TERM")


class WorkersNotifier(SystemdNotifier):
    """
    L{SystemdNotifier} for the parent: C{READY=1} once every worker listens
    (L{Arbiter.whenListening}), the worker count in C{STATUS=}, and the
    watchdog pinged only while every worker is alive, so that systemd
    restarts a service whose workers keep dying.
    """

    service: Arbiter  # type: ignore[assignment]

    def healthy(self) -> bool:
        # The parent pings the watchdog only while every worker is alive.
        return self.service.allAlive()

    def statusLine(self) -> str:
        arbiter = self.service
        alive = sum(1 for w in arbiter.workers.values() if w.listening and not w.ended)
        return f"workers: {alive}/{arbiter.count} up; {super().statusLine()}"


def makeArbiter(config: Any, logObserver: ILogObserver | None) -> Arbiter:
    """The parent service for C{config["workers"]} workers."""
    from twisted.internet import reactor

    twistdOptions = getattr(config, "parent", None)
    argv = [*twistdArguments(twistdOptions, reactor), "echoplug", *config.argv]
    arbiter = Arbiter(config["workers"], argv, workerEnvironment(os.environ),
                      drainTimeout=config["drain-timeout"], logObserver=logObserver)
    for description, endpoint in config["endpoints"]:
        arbiter.listen(description, endpoint)
    for description, endpoint in config["datagram-endpoints"]:
        arbiter.listenDatagrams(description, endpoint)
    return arbiter
