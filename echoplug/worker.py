# -*- test-case-name: tests.test_workers -*-
"""
One C{--workers} worker: a C{twistd echoplug} started by the parent
(L{echoplug.workers}) with the parent's own options plus the hidden
C{--worker N,PARENT_PID}.

It binds nothing. Its descriptors come from the parent, at fixed numbers:

  - L{LIFELINE} (0): the read end of a pipe the parent never writes; EOF
    means the parent is gone, and the worker drains and exits;
  - L{REPORT} (3): the write end of a pipe to the parent, where the worker
    says C{listening} once it accepts;
  - L{BOOKS} (4): the shared counters (L{echoplug.books});
  - L{FIRST_PORT} (5) on: the listening sockets, one per C{--port} in
    order, adopted with C{adoptStreamPort} (TLS ones wrapped with the
    C{ssl:} endpoint's own context factory).

Everything else is an ordinary echoplug: the same factory, limits
(C{--max-connections} is per worker), drain on SIGTERM, access log; each
log event carries C{worker} (L{WorkerTag}).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import stdio
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echoplug import _twisted
from echoplug.books import (
    ACCEPTED,
    BUFFERED,
    CLOSED_IN,
    CLOSED_OUT,
    HEADER,
    OPEN,
    PID,
    REFUSED,
    STALLS,
    UDP_DROPPED,
    UDP_RECEIVED,
    UDP_RECEIVED_BYTES,
    UDP_SENT,
    UDP_SENT_BYTES,
    Books,
    FairShare,
)
from echoplug.factory import Echo, EchoFactory
from echoplug.service import EchoService, Listener, RefuseByClosing

LIFELINE = 0
REPORT = 3
BOOKS = 4
FIRST_PORT = 5
#: How often a worker copies its per-message counters (the --max-buffered
#: bound's, the UDP guards') to its slot, for --metrics.
SNAPSHOT_INTERVAL = 1.0
PR_SET_PDEATHSIG = 1
#: Seconds between EOF on the lifeline and stopping, if nothing else has.
LIFELINE_GRACE = 0.2


class WorkerFactory(EchoFactory):
    """
    L{EchoFactory} that writes its counters to its slot of the shared
    L{Books} once per connection event and keeps to its L{FairShare}.
    """

    books: Books
    slot: int
    fairShare: FairShare | None = None
    #: The worker's UDP guards (L{echoplug.udp.DatagramGuards}), if it serves UDP.
    guards: Any = None

    def connectionMade(self, proto: Echo) -> None:
        super().connectionMade(proto)
        self.post()

    def connectionLost(self, proto: Echo, reason: Failure) -> None:
        super().connectionLost(proto, reason)
        self.post()

    def refuse(self, addr: Any, why: str) -> None:
        super().refuse(addr, why)
        self.books.set(self.slot, REFUSED, self.refused)

    def post(self) -> None:
        books, slot = self.books, self.slot
        books.set(slot, ACCEPTED, self.accepted)
        books.set(slot, OPEN, len(self.connections))
        books.set(slot, CLOSED_IN, self.bytesReceived)
        books.set(slot, CLOSED_OUT, self.bytesSent)
        if self.fairShare is not None:
            self.fairShare.check()

    def headerFailed(self, proto: Echo, reason: str, why: str) -> None:
        super().headerFailed(proto, reason, why)
        self.books.set(self.slot, HEADER[reason], self.headerFailures[reason])

    def snapshot(self) -> None:
        """What changes per message or datagram, for --metrics (once a second)."""
        books, slot, bound = self.books, self.slot, self.bound
        if bound is not None:
            books.set(slot, BUFFERED, bound.total)
            books.set(slot, STALLS, bound.stalls)
        g = self.guards
        if g is not None:
            books.set(slot, UDP_RECEIVED, g.received)
            books.set(slot, UDP_RECEIVED_BYTES, g.receivedBytes)
            books.set(slot, UDP_SENT, g.sent)
            books.set(slot, UDP_SENT_BYTES, g.sentBytes)
            for reason, n in g.dropped.items():
                books.set(slot, UDP_DROPPED[reason], n)


def socketFamily(fd: int) -> int:
    """The address family of the socket at C{fd} (which stays open)."""
    with socket.socket(fileno=os.dup(fd)) as s:
        return int(s.family)


def backlogOf(description: str, default: int = 50) -> int:
    """The C{backlog=} of an endpoint description, else C{default} (--backlog)."""
    m = re.search(r"(?:^|:)backlog=(\d+)", description)
    return int(m[1]) if m else default


class AdoptedListener(Listener):
    """
    Listen on a socket the parent bound (descriptor C{fd}), with the shared
    factory; C{endpoint} is the parsed C{ssl:} endpoint for a TLS listener,
    else C{None}.
    """

    def __init__(self, description: str, endpoint: Any, fd: int,
                 factory: EchoFactory, fairShare: FairShare, backlog: int = 50) -> None:
        super().__init__(description, endpoint, factory)
        self.backlog = backlogOf(description, backlog)
        self.echoFactory = factory
        self.fd = fd
        self.fairShare = fairShare

    def privilegedStartService(self) -> None:
        from twisted.internet import reactor as installed

        reactor: Any = installed
        Service.privilegedStartService(self)
        try:
            family = socketFamily(self.fd)
        except OSError as e:
            raise SystemExit(f"echoplug: worker: no listening socket at descriptor "
                             f"{self.fd} for {self.description}: {e.strerror}") from None
        factory: Any = self.factory
        if self.endpoint is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            # As listenSSL does: TLS around a factory that refuses with a
            # protocol (RefuseByClosing), never with None.
            refusing: Any = RefuseByClosing(self.echoFactory)
            factory = TLSMemoryBIOFactory(_twisted.sslContextFactory(self.endpoint), False,
                                          refusing)
        os.set_blocking(self.fd, False)
        port: IListeningPort
        if family == socket.AF_UNIX:
            # Not reactor.adoptStreamPort: its UNIX port shuts the socket
            # down for every process when it stops (see echoplug._twisted).
            port = _twisted.adoptSharedUNIXPort(reactor, self.fd, factory,
                                                self.backlog)
        else:
            port = reactor.adoptStreamPort(self.fd, family, factory)
        # The port holds its own duplicate of the descriptor.
        os.close(self.fd)
        # Under epoll, one worker woken per connection, not all of them.
        _twisted.exclusiveWakeup(reactor, port)
        self.fairShare.ports.append(port)
        self._listening(port)


class Lifeline(Protocol):
    """
    The worker's end of its pipes to the parent: it says C{listening} once
    every port accepts, and stops the worker when the parent goes away
    (EOF on L{LIFELINE}), whatever killed the parent.
    """

    log = Logger()

    def __init__(self, service: WorkerService) -> None:
        self.service = service

    def connectionMade(self) -> None:
        self.service.whenListening().addCallback(self._report)

    def _report(self, ports: list[IListeningPort]) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.write(b"listening\n")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        from twisted.internet import reactor

        # On Linux the parent's death also sends SIGTERM (dieWithParent),
        # and its stop is already on its way: give it a moment, so that the
        # reactor is not stopped twice (a traceback).
        reactor.callLater(LIFELINE_GRACE, self._stop)

    def _stop(self) -> None:
        from twisted.internet import reactor as installed

        reactor: Any = installed
        if self.service.running:
            self.log.info("parent process gone: stopping")
            reactor.stop()


class WorkerService(EchoService):
    """
    L{EchoService} of one worker: adopted listeners, the lifeline to the
    parent, and the slot of the shared books it writes.
    """

    def __init__(self, factory: WorkerFactory, number: int, parentPid: int,
                 logObserver: Any = None, drainTimeout: float = 5.0,
                 snapshots: bool = False) -> None:
        super().__init__(factory, logObserver=logObserver, drainTimeout=drainTimeout)
        self.number = number
        self.parentPid = parentPid
        self.books = factory.books
        self.workerFactory = factory
        reactor = self.reactor
        self.fairShare = FairShare(factory.books, factory.slot, reactor,
                                   lambda port: _twisted.exclusiveWakeup(reactor, port))
        factory.fairShare = self.fairShare
        self.snapshots = snapshots
        self._snapshotter: Any = None
        self._stdio: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # The listeners are adopted: this worker is counted as it listens.
        self.books.set(self.workerFactory.slot, PID, os.getpid())

    def startService(self) -> None:
        super().startService()
        standardIO: Any = stdio.StandardIO  # POSIX's: it takes the descriptors
        self._stdio = standardIO(Lifeline(self), stdin=LIFELINE, stdout=REPORT)
        if self.snapshots:
            from twisted.internet import task

            self._snapshotter = task.LoopingCall(self.workerFactory.snapshot)
            self._snapshotter.start(SNAPSHOT_INTERVAL, now=False)

    def stopService(self) -> Any:
        # No longer accepting: the other workers stop counting this one.
        self.books.set(self.workerFactory.slot, PID, 0)
        self.fairShare.stop()
        if self._snapshotter is not None and self._snapshotter.running:
            self._snapshotter.stop()
            self.workerFactory.snapshot()
        return super().stopService()


@implementer(ILogObserver)
class WorkerTag:
    """
    Mark every event of worker C{number} before C{observer} sees it: the
    field C{worker} (a key of its own in JSON lines) and, for text lines,
    C{worker=N} beside the namespace and level: C{[echoplug...#info worker=2]}.
    """

    def __init__(self, observer: ILogObserver, number: int) -> None:
        self.observer: Any = observer
        self.number = number
        self.suffix = f" worker={number}"

    def __call__(self, event: LogEvent) -> None:
        event["worker"] = self.number
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = (f"{event.get('log_namespace', '-')}"
                      f"#{'-' if level is None else level.name}")
        event["log_system"] = system + self.suffix
        self.observer(event)


def dieWithParent(parentPid: int) -> None:
    """
    Ask the kernel for SIGTERM when the parent dies (Linux's
    PR_SET_PDEATHSIG), then check that it has not died already: the request
    can only be made here, after exec, not between fork and exec. SIGTERM,
    not SIGKILL: the worker drains like any echoplug being stopped. The
    lifeline pipe (L{Lifeline}) covers what this misses (other systems, a
    parent thread that exits).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parentPid:
        raise SystemExit(f"echoplug: worker: parent {parentPid} is gone")
    # A process group of its own: a signal for the parent's group (Ctrl-C in
    # a terminal, timeout(1)) reaches the parent alone, which passes it on
    # once; a second copy would end the worker's drain at once.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def parseWorker(value: str) -> tuple[int, int]:
    """C{--worker N,PARENT_PID} as (N, PARENT_PID)."""
    try:
        number, parent = (int(v) for v in value.split(","))
    except ValueError:
        raise SystemExit(f"echoplug: --worker {value!r} is for the parent to give "
                         "(N,PARENT_PID)") from None
    if number < 1 or parent < 1:
        raise SystemExit(f"echoplug: --worker {value!r} is for the parent to give")
    return number, parent


def makeWorkerService(config: Any, factory: WorkerFactory,
                      logObserver: ILogObserver | None) -> WorkerService:
    """The service of worker C{config["worker"]}: see the module docstring."""
    number, parentPid = parseWorker(config["worker"])
    dieWithParent(parentPid)
    books = Books(fd=BOOKS)
    factory.books, factory.slot = books, number - 1
    service = WorkerService(
        factory, number, parentPid,
        logObserver=None if logObserver is None else WorkerTag(logObserver, number),
        drainTimeout=config["drain-timeout"], snapshots=config["metrics"] is not None)
    for i, (description, endpoint) in enumerate(config["endpoints"]):
        AdoptedListener(description, endpoint, FIRST_PORT + i, factory,
                        service.fairShare, config["backlog"]).setServiceParent(service)
    if config["datagram-endpoints"]:
        factory.guards = adoptDatagrams(config, service, FIRST_PORT + len(config["endpoints"]))
    return service


def adoptDatagrams(config: Any, service: WorkerService, first: int) -> Any:
    """
    Serve the parent's UDP sockets, at descriptors C{first} on, with one set
    of guards: the rate limits are this worker's (per worker, as the caps).
    """
    from twisted.internet import reactor

    from echoplug.tap import listenDatagrams
    from echoplug.udp import AdoptedDatagramEndpoint

    adopted = []
    for i, (description, _) in enumerate(config["datagram-endpoints"]):
        fd = first + i
        try:
            family = socketFamily(fd)
        except OSError as e:
            raise SystemExit(f"echoplug: worker: no UDP socket at descriptor {fd} for "
                             f"{description}: {e.strerror}") from None
        # maxPacketSize 65535, and the descriptor closed once adopted.
        adopted.append((description, AdoptedDatagramEndpoint(reactor, fd, family)))
    return listenDatagrams(config, service, adopted)
