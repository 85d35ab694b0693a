# -*- test-case-name: tests.test_service -*-
"""
The service: listeners and the lifecycle of one echoplug process.

L{EchoService} is a L{MultiService} of L{Listener}s that share one
L{EchoFactory}. A listener binds in C{privilegedStartService}, before twistd
drops privileges, and turns a port that cannot be bound into one line and a
non-zero exit instead of a traceback.

The service also owns what spans the process's life: the idle-timeout sweep,
the cap that keeps the select reactor below FD_SETSIZE, the graceful drain on
SIGTERM and SIGHUP (stop listening, let open connections finish, abort what
is left at the drain timeout), and a SIGUSR1 that does no harm when there is
no log file to rotate.
"""

from __future__ import annotations

import select
import signal
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from echoplug._twisted import guardUNIXAccept, leanTCPAccept
from echoplug.factory import EchoFactory
from echoplug.logs import formatAddress


def reactorName(reactor: object) -> str:
    """
    The short name (as given to C{twistd -r}) of the installed reactor,
    found through the same reactor plugins twistd reads, so reactors that
    other packages ship are named too. Falls back to the class name.
    """
    from twisted.application.reactors import getReactorTypes

    module = type(reactor).__module__
    for installer in getReactorTypes():
        # moduleName: Twisted's Reactor has it, IReactorInstaller does not say.
        if (installer.shortName != "default"
                and getattr(installer, "moduleName", None) == module):
            return str(installer.shortName)
    return type(reactor).__name__


#: select() cannot watch a descriptor at or above this (Python raises
#: ValueError, and Twisted's SelectReactor then drops descriptors silently).
FD_SETSIZE = 1024
#: Descriptors kept free under the select reactor for what is not a
#: connection: stdio, listening ports, log files, the reactor's waker, the
#: descriptor Twisted reserves for EMFILE recovery, a socket being refused.
FD_HEADROOM = 64


def selectWall(reactor: object) -> int | None:
    """
    FD_SETSIZE if C{reactor} waits with select(), else C{None} (poll, epoll
    and asyncio's epoll selector have no such limit).
    """
    from twisted.internet.selectreactor import SelectReactor

    return FD_SETSIZE if isinstance(reactor, SelectReactor) else None


def raiseNoFile(wall: int | None) -> int:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit, unless select() is in
    use (C{wall}), where more descriptors are no use; return the soft limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if wall is None and soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Refused(Protocol):
    """A connection over a cap, behind a wrapper (TLS): closed at once."""

    transport: ITCPTransport

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class RefuseByClosing(ServerFactory[Protocol]):
    """
    Let a wrapping factory (TLS) see a refusal as a protocol that closes at
    once rather than as C{None}, which C{WrappingFactory} cannot handle.
    """

    noisy = False

    def __init__(self, factory: EchoFactory) -> None:
        self.factory = factory

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.factory.buildProtocol(addr) or Refused()


class Listener(Service):
    """
    Listen on one endpoint with a factory: the echo service's shared
    L{EchoFactory}, or any other server factory (the metrics site).

    @ivar ready: fires with the listening port once it listens.
    """

    log = Logger()

    def __init__(
        self, description: str, endpoint: IStreamServerEndpoint,
        factory: ServerFactory[Any],
    ) -> None:
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self.ready: defer.Deferred[IListeningPort] = defer.Deferred()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failed: list[Failure] = []
        factory = self.factory
        if isinstance(self.endpoint, SSL4ServerEndpoint) or self.description.startswith(
                ("ssl:", "tls:")):
            # TLS wraps our factory, and wraps the None of a refusal too,
            # which then fails with a traceback: refuse with a protocol.
            assert isinstance(self.factory, EchoFactory), "TLS serves the echo"
            factory = RefuseByClosing(self.factory)
        d = self.endpoint.listen(factory)
        d.addCallbacks(self._listening, failed.append)
        if failed:
            # TCP, UNIX and systemd endpoints listen at once, so a port in
            # use shows up here, before the reactor runs: exit with one line.
            raise SystemExit(f"echoplug: cannot listen on {self.description}: "
                             f"{failed[0].getErrorMessage()}")

    def startService(self) -> None:
        if self.port is None and not self.ready.called:
            self.privilegedStartService()
        super().startService()

    def _listening(self, port: IListeningPort) -> None:
        from twisted.internet import reactor

        # A UNIX client bound to a 4-character name would make Twisted's
        # accept loop raise (a traceback per connection): see _twisted.py.
        guardUNIXAccept(port)
        if isinstance(self.factory, EchoFactory):
            # echoplug's accept loop and transport for the echo (not for the
            # metrics site): the same behaviour, less work per connection.
            lean = leanTCPAccept(port)
            keepalive = self.factory.keepalive
            if keepalive is not None and lean and not self.description.startswith("systemd:"):
                # Once on a socket echoplug (or its --workers parent) made;
                # a systemd socket outlives us and keeps its unit's settings,
                # so its connections get the options one by one.
                keepalive.listen(port)
                port.keepaliveSet = True  # type: ignore[attr-defined]
        self.port = port
        name = reactorName(reactor)
        self.log.info(
            "listening on {address}, reactor={reactor} ({cls})",
            address=formatAddress(port.getHost()),
            reactor=name,
            cls=type(reactor).__name__,
        )
        self.ready.callback(port)

    def stopService(self) -> defer.Deferred[Any] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        # Closing a listening socket makes the kernel reset every connection
        # in its accept queue: clients that had connected, and perhaps sent
        # data, would see a reset (a balancer logs them as failures). Accept
        # them first; the drain then serves them like any open connection.
        acceptQueued(port)
        # Twisted closes the socket a reactor turn after stopListening(), and
        # what connects meanwhile would be reset too: accept that as well, at
        # the last moment, right before the socket closes.
        close = getattr(port, "connectionLost", None)
        if close is not None:
            def acceptThenClose(reason: Failure) -> None:
                acceptQueued(port)
                close(reason)

            port.connectionLost = acceptThenClose  # type: ignore[attr-defined]
        return defer.maybeDeferred(port.stopListening)


def acceptQueued(port: object, rounds: int = 100) -> None:
    """
    Accept the connections already queued on a listening C{port}, by running
    its own accept loop (C{doRead}, which accepts up to C{numberAccepts} at a
    time, building protocols with the port's factory) while its socket is
    readable, at most C{rounds} times (a port out of descriptors stays
    readable; its C{doRead} logs that and accepts nothing).

    Only C{IReadDescriptor}'s public C{fileno} and C{doRead} are used; a
    port without them (not a socket port) is left alone.
    """
    doRead = getattr(port, "doRead", None)
    fileno = getattr(port, "fileno", None)
    if doRead is None or fileno is None:
        return
    try:
        fd = fileno()
    except (OSError, ValueError):
        return
    if fd < 0:
        return
    # poll(), not select(): the descriptor may be past FD_SETSIZE.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _ in range(rounds):
        if not poller.poll(0):
            return
        doRead()


class EchoService(MultiService):
    """
    One echoplug server: its listeners and the factory they share.

    @ivar drainTimeout: seconds that open connections get to finish after
        C{stopService} (SIGTERM) before they are aborted.
    """

    log = Logger()
    #: The sweep runs this many times per idle timeout, each over a share of
    #: the connections, so that each is checked every half timeout and
    #: closed after between 1 and 1.5 timeouts without traffic.
    sweepsPerTimeout = 16

    def __init__(
        self,
        factory: EchoFactory,
        logObserver: ILogObserver | None = None,
        drainTimeout: float = 5.0,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        self.factory = factory
        self.logObserver = logObserver
        self.drainTimeout = drainTimeout
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self._sweeper: task.LoopingCall | None = None
        self._draining: defer.Deferred[None] | None = None
        self._drainTimer: Any = None
        self._descriptorsApplied = False

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes an Application (a Componentized) and starts logging to
        # its ILogObserver component if it has one: the documented hook for a
        # custom observer, and the only one a plugin can reach.
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def listen(self, description: str, endpoint: IStreamServerEndpoint) -> Listener:
        listener = Listener(description, endpoint, self.factory)
        listener.setServiceParent(self)
        return listener

    @property
    def listeners(self) -> list[Listener]:
        return [s for s in self if isinstance(s, Listener)]

    def whenListening(self) -> defer.Deferred[list[IListeningPort]]:
        """Fires with every listening port, once all of them listen."""
        return defer.gatherResults([listener.ready for listener in self.listeners])

    def privilegedStartService(self) -> None:
        if not self._descriptorsApplied:
            self._descriptorsApplied = True
            self.applyDescriptorLimits()
        super().privilegedStartService()

    def applyDescriptorLimits(self) -> None:
        """
        Keep connections below the descriptors this process can use, so that
        a connection over the limit is refused by echoplug (counted, and
        logged at most once a second) instead of failing inside the reactor.

        Under select, no descriptor may reach FD_SETSIZE. Otherwise the soft
        RLIMIT_NOFILE is raised to the hard one (the soft default of 1024
        exists for select() programs; others are expected to raise it), and
        what is left of it caps connections. Warn if a larger
        --max-connections was asked for.
        """
        factory = self.factory
        wall = selectWall(self.reactor)
        if reactorName(self.reactor) == "select":
            # Twisted's own select reactor: its --help-reactors line is not
            # ours to change, so say it here, once.
            self.log.info("-r echoplug-select is the faster select reactor: the same "
                          "select(), without a log context per event (docs/performance.md)")
        limit = raiseNoFile(wall)
        reason = f"RLIMIT_NOFILE is {limit}; raise it with ulimit -n or LimitNOFILE="
        if wall is not None:
            factory.fdWall = wall
            if wall <= limit:
                limit = wall
                reason = (f"select() cannot watch descriptors past {wall}; "
                          "use -r epoll for more")
        cap = max(1, limit - min(FD_HEADROOM, limit // 2))
        asked = factory.maxConnections
        if asked is not None and asked <= cap:
            return
        factory.maxConnections = cap
        if asked is None:
            self.log.info("at most {cap} connections at once ({reason})", cap=cap, reason=reason)
        else:
            self.log.warn("--max-connections {asked} lowered to {cap} ({reason})",
                          asked=asked, cap=cap, reason=reason)

    def startService(self) -> None:
        self._draining = None
        super().startService()
        # After the reactor has installed its own handlers (SIGTERM, SIGINT).
        self.reactor.callWhenRunning(self._handleSignals)
        timeout = self.factory.idleTimeout
        if timeout:
            self._sweeper = task.LoopingCall(self.factory.sweepIdle)
            self._sweeper.clock = self.reactor
            # Never more often than 20 times a second, however short the timeout.
            interval = max(timeout / self.sweepsPerTimeout, 0.05)
            self.factory.setSweeps(round(timeout / interval))
            self._sweeper.start(interval, now=False)

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop listening at once, then drain: open connections keep echoing
        until their clients finish, and whatever is open after
        C{drainTimeout} seconds is aborted. Fires when no connection is left.
        """
        if self._draining is not None:
            return self._draining
        self._hurryOnSignals()
        stopped = super().stopService()
        d: defer.Deferred[None] = defer.Deferred()
        self._draining = d
        n = len(self.factory.connections)
        if n:
            self.log.info("stopped listening; draining {n} connection(s), at most {t:g}s",
                          n=n, t=self.drainTimeout)
        self._drainTimer = self.reactor.callLater(self.drainTimeout, self._endDrain,
                                                  "drain timeout")
        stopped.addErrback(lambda f: self.log.failure("while stopping listeners", f))

        def listenersClosed(_: object) -> None:
            # Only now: a listener accepts what is queued until its socket
            # closes, and those connections are drained like the others.
            self.factory.whenEmpty().addCallback(lambda _: self._drained())

        stopped.addCallback(listenersClosed)
        return defer.gatherResults([stopped, d]).addCallback(lambda _: None)

    def _endDrain(self, why: str) -> None:
        """Abort every connection still open; the drain ends right after."""
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.cancel()
        self._drainTimer = None
        n = self.factory.closeAll(why)
        if n:
            self.log.info("{why}: closed {n} connection(s)", why=why, n=n)
        # The aborted connections report connectionLost on the next reactor
        # turn; never wait longer than that, whatever a transport does.
        self.reactor.callLater(0.5, self._drained)

    def _drained(self) -> None:
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.cancel()
        self._drainTimer = None
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self.factory.bound is not None:
            self.factory.bound.stop()
        d = self._draining
        if d is not None and not d.called:
            d.callback(None)

    def _handleSignals(self) -> None:
        """
        SIGHUP and SIGUSR1, whose default action is to end the process at
        once, without a drain, get handlers, where nobody else has one:

          - SIGHUP drains, as SIGTERM does. It comes from a terminal that
            went away (a foreground twistd -n whose ssh session dropped, a
            closed tmux pane) or from an operator; either way the process is
            meant to end, and its clients deserve the drain. A server that
            outlived its terminal would write its log to a dead tty; run it
            under nohup (SIGHUP ignored, and left ignored) to keep it.
          - SIGUSR1 rotates twistd's log file (C{-l FILE}, or twistd.log for
            a daemon: twistd's own handler, left in place). Logging to stdout
            or syslog there is nothing to rotate: one log line, nothing else.

        Only where the reactor installed its own handlers (twistd does; a
        test runner driving the reactor does not), and only for a signal at
        its default: an ignored or handled one is left as it is.
        """
        if signal.getsignal(signal.SIGTERM) != getattr(self.reactor, "sigTerm", None):
            return
        if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            signal.signal(signal.SIGHUP, self._sigHup)
        if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            signal.signal(signal.SIGUSR1, self._sigUsr1)

    def _sigHup(self, number: int, frame: object) -> None:
        self.reactor.callFromThread(self.log.info, "Received SIGHUP, shutting down.")
        self.reactor.callFromThread(self.reactor.stop)

    def _sigUsr1(self, number: int, frame: object) -> None:
        self.reactor.callFromThread(
            self.log.info, "Received SIGUSR1: no log file to rotate (the log goes to "
            "stdout or syslog); ignored")

    def _hurryOnSignals(self) -> None:
        """
        Once shutdown has begun, a second SIGTERM, SIGINT or SIGHUP ends the
        drain at once. Twisted's own handler would call reactor.stop() again, which
        raises ReactorNotRunning and logs a traceback.
        """
        def hurry(number: int, frame: object) -> None:
            self.reactor.callFromThread(self._endDrain, "second signal")

        # Only where the reactor installed its own handlers (twistd does;
        # a test runner driving the reactor does not): leave others alone.
        for sig, theirs in ((signal.SIGTERM, getattr(self.reactor, "sigTerm", None)),
                            (signal.SIGINT, getattr(self.reactor, "sigInt", None)),
                            (signal.SIGHUP, self._sigHup)):
            if signal.getsignal(sig) == theirs:
                signal.signal(sig, hurry)
