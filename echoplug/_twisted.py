# -*- test-case-name: tests.test__twisted -*-
"""
Every read of a private or undocumented Twisted name, in one place.

Twisted's public interfaces cannot say how many bytes a transport still has
to send, cannot send at once, and cannot hand out the file behind twistd's
log observer. echoplug needs those, so it reads some of Twisted's internals.
They are all here, and nowhere else in echoplug, so that a reader sees what
echoplug relies on, and tests/test__twisted.py pins each one: a Twisted
upgrade that changes them fails the tests instead of silently losing data or
speed.

    ==================================  ==========================  ===========================
    Name                                What it is                  Why echoplug reads it
    ==================================  ==========================  ===========================
    FileDescriptor.dataBuffer, offset,  a socket transport's        unsentBytes: the idle sweep
    _tempDataBuffer, _tempDataLen       unsent bytes (joined, sent  and the bytes-sent metric;
                                        up to offset; not joined)   eagerWrite keeps the order
    FileDescriptor.producerPaused,      a paused transport; a       eagerWrite, idle: leave
    disconnecting, _writeDisconnecting  close under way (lose,      those to the transport's
    tcp.Connection._aborting            half-close, abort)          own write path
    FileDescriptor.connected, producer  open; a producer is set     idle: close at once
    tcp.Connection.TLS                  startTLS() was called       usesTLS: no plaintext
                                                                    past TLS
    tcp.Connection.socket               the connected socket        eagerWrite: send at once
    TLSMemoryBIOProtocol._appSendBuffer plaintext not yet given     unsentBytes: bytes sent
                                        to OpenSSL                  under TLS
    _twistd_unix.UnixAppLogger          the observer twistd would   twistdLogObserver: log
    ._getLogObserver                    log to (stdout, -l FILE,    where twistd would
                                        syslog, a daemon's file)
    FileLogObserver._outFile            a text observer's file      observerFile: same file
    reactor._selectables,               the posix reactors' table   dispatch, epollDoPoll,
    _doReadOrWrite, _poller             of descriptors, their       pollDoPoll: the lean
                                        handler, the poll object    reactors
    reactor._reads, _writes,            the select reactor's sets,  selectDoSelect: the lean
    _preenDescriptors,                  its clean-up after a bad    select reactor
    selectreactor._select               descriptor, select.select
    EPollReactor.doPoll,                the methods the lean        copied here without
    PollReactor.doPoll,                 reactors replace            log.callWithLogger; their
    SelectReactor.doSelect                                          source is pinned by hash
    event key log_flattened             pre-rendered fields, keyed  logs.LogLine fills it;
                                        "name!conversion:spec"      formatEvent reads it
    pytest_twisted._install_reactor     pytest-twisted's installer  installTestReactor: the
                                                                    tests' reactor by name
    SSL4ServerEndpoint                  an ssl: endpoint's context  sslContextFactory: a
    ._sslContextFactory                 factory                     --workers worker wraps
                                                                    its adopted TLS port
    unix.Port._fromListeningDescriptor  what adoptStreamPort calls  adoptSharedUNIXPort
                                        for AF_UNIX
    _SocketCloser._shouldShutdown       shutdown() before close()   SharedUNIXPort,
                                        on stopListening            stopWithoutShutdown: a
                                                                    shared socket stays up
    endpoints._parse                    serverFromString's split    endpointArguments: udp:
                                        of a description (colons    descriptions, escaped as
                                        escaped with backslashes)   TCP ones are
    AdoptedStreamServerEndpoint.fileno  the descriptor a systemd:   systemdDescriptor: find a
                                        endpoint found by name or   ListenDatagram= socket as
                                        index (undocumented)        systemd: finds a stream
    tcp.Port.doRead, tcp.Server         the accept loop and the     LeanPort, LeanServer:
    .__init__, .getPeer, .__repr__,     server transport's set-up,  copied, less the work per
    tcp.Connection.__init__,            names and close             connection; source pinned
    .connectionLost, .logPrefix                                     by hash
    tcp.Port.socket, numberAccepts,     the listening socket, the   LeanPort's loop, as
    sessionno, _realPortNumber,         accept batch, the session   Twisted's; listeningSocket
    _buildAddr; socket._accept          count, the port number      (keepalive on the
                                        and address; the raw accept listener)
    _SocketCloser._shouldShutdown,      shutdown() before close();  LeanServer: close() alone;
    _AbortingMixin, _getLogPrefix,      the abort's reason; the     the prefix, built when
    Server._addressType                 prefix; IPv4 or IPv6        asked
    ==================================  ==========================  ===========================

Under C{--workers} (L{echoplug.worker}, L{echoplug.workers}), sockets are
shared by the parent and every worker:

  - L{sslContextFactory}: C{SSL4ServerEndpoint._sslContextFactory}. A
    C{--workers} worker adopts a TLS listener from its parent and must wrap
    it with the same context factory the endpoint would have used; the
    endpoint has no public accessor for it.
  - L{adoptSharedUNIXPort}: C{unix.Port._fromListeningDescriptor}, what
    C{reactor.adoptStreamPort} itself calls for C{AF_UNIX}, and
    C{_SocketCloser._shouldShutdown}. An adopted TCP port leaves the socket
    as it found it, but an adopted UNIX port, when it stops listening, calls
    C{shutdown(SHUT_RDWR)} on the socket (Linux then stops it listening for
    every process that holds it) and unlinks its path; on start it also
    chmods the path to its C{mode} (0o666 by default) and calls
    C{listen(backlog)} again. Shared by a parent and other workers, one
    worker's restart would leave the rest deaf and the socket world-writable.
    L{SharedUNIXPort} only closes its own descriptor, and keeps the path's
    mode and the given backlog.
  - L{stopWithoutShutdown}: C{_SocketCloser._shouldShutdown} again, for the
    parent's own ports, which are ordinary ones: the parent closes its copy
    of each shared socket as shutdown begins, while the workers may still
    be accepting on theirs; a shutdown() would pull the socket from under
    them (their accept() fails with EINVAL, with a traceback).

The lean TCP listener (L{LeanPort}, L{LeanServer}) is echoplug's own
accept loop and server transport, used by every echo listener
(L{echoplug.service.Listener} swaps a plain C{tcp.Port} for it, as
L{guardUNIXAccept} does for UNIX ports). It is Twisted's code less what an
echo does not need per connection, with Twisted's own loop for every accept
error; the trade-offs are in docs/performance.md.

The eager write's closure (L{eagerWrite}) runs once per message: it reads
the attributes directly, with no call in between, as fast as it was when it
lived in L{echoplug.eager}, which decides when to use it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterable
from typing import IO, Any

from twisted.internet import abstract, address, error, main, selectreactor, tcp, unix
from twisted.internet.interfaces import IListeningPort
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.internet.protocol import ServerFactory
from twisted.logger import FileLogObserver
from twisted.python import log
from twisted.python.failure import Failure

# Transports: what is left to send.


def socketTransport(transport: Any) -> Any:
    """
    The socket transport under C{transport}: TLS wraps the TCP one, so look
    through wrappers (C{.transport}) to the one with a C{dataBuffer}.
    """
    while not hasattr(transport, "dataBuffer") and hasattr(transport, "transport"):
        transport = transport.transport
    return transport


def unsentBytes(transport: object) -> int:
    """
    Bytes written to C{transport} that it has not yet handed on; 0 if it
    keeps no such count (a test's C{StringTransport}).

    Twisted's socket transports (C{FileDescriptor}, under every reactor
    echoplug runs on) keep them in C{dataBuffer} from C{offset} on, plus
    C{_tempDataLen} bytes not yet joined to it; both survive
    C{connectionLost}, so this works at close time too. A TLS transport
    keeps plaintext not yet given to OpenSSL in C{_appSendBuffer}: the bytes
    the protocol wrote, as C{bytesIn} counts them. For the ciphertext still
    in the kernel's way, ask C{unsentBytes(socketTransport(t))}.
    """
    buffered = getattr(transport, "dataBuffer", None)
    if buffered is not None:
        return (len(buffered) - getattr(transport, "offset", 0)
                + getattr(transport, "_tempDataLen", 0))
    pending = getattr(transport, "_appSendBuffer", None)
    if pending:
        return sum(len(chunk) for chunk in pending)
    return 0


def usesTLS(transport: Any) -> bool:
    """C{startTLS()} was called on this TCP transport (C{tcp.Connection.TLS})."""
    return bool(transport.TLS)


def eagerWrite(transport: Any,
               queued: Callable[[], None] | None = None) -> Callable[[bytes], None]:
    """
    A write function for a plain TCP or UNIX transport (L{echoplug.eager}
    decides which) that calls C{socket.send} at once when nothing is queued,
    no producer is paused and no close is under way, and hands only the
    remainder to C{transport.write}, so the transport's own buffering,
    producer pausing, half-close and abort logic see exactly what they
    would have seen otherwise. C{queued}, if given, is called after the
    remainder of a send went into the empty buffer: off the fast path.
    """
    send = transport.socket.send
    write = transport.write

    def eagerWrite(data: bytes) -> None:
        t = transport
        if (t.dataBuffer or t._tempDataBuffer or t.producerPaused or t.disconnecting
                or t._aborting or t._writeDisconnecting):
            # Something is queued, or a close is under way: keep the order.
            write(data)
            return
        try:
            sent = send(data)
        except OSError:
            # EAGAIN (the kernel buffer is full), or an error such as a reset:
            # the transport buffers the data and finds the error itself on
            # its next turn, exactly as if we had never tried.
            sent = 0
        if sent < len(data):
            write(data[sent:])
            if queued is not None:
                queued()

    return eagerWrite


def idle(transport: Any) -> bool:
    """
    Nothing is queued on this connected socket transport, no producer is
    registered and no close is under way: C{FileDescriptor} would close it
    on its next write turn.
    """
    return bool(transport.connected and transport.producer is None
                and not transport.dataBuffer and not transport._tempDataBuffer
                and not transport.disconnecting and not transport._aborting
                and not transport._writeDisconnecting)


def closeNow(transport: Any) -> None:
    """
    The steps C{FileDescriptor} takes when its buffer is flushed after
    C{loseConnection}: stop reading and writing, C{connectionLost} with
    C{ConnectionDone}. Only for a transport that is L{idle}: a plain TCP or
    UNIX one (L{echoplug.eager.PLAIN}), whose C{connectionLost} runs
    C{FileDescriptor.connectionLost}, which stops reading and writing first
    thing (pinned in tests/test__twisted.py), with no producer to stop.
    """
    transport.connectionLost(_DONE)


#: One C{Failure(ConnectionDone)} for every clean close, as Twisted's own
#: C{_disconnectSelectable} keeps one (its C{faildict}): building a Failure
#: per connection costs more than the rest of the close.
_DONE = Failure(main.CONNECTION_DONE)


# Endpoint descriptions: echoplug's udp: and systemd-udp: forms follow
# Twisted's conventions by using Twisted's own parsing.


def endpointArguments(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description exactly as C{serverFromString} does:
    positional arguments (the prefix first) and C{key=value} ones, with
    colons escaped by backslashes (C{interface=\\:\\:1}).
    """
    from twisted.internet.endpoints import _parse

    args, kwargs = _parse(description)
    return [str(a) for a in args], {str(k): str(v) for k, v in kwargs.items()}


def systemdDescriptor(reactor: Any, which: str) -> int:
    """
    The descriptor that C{serverFromString(reactor, "systemd:domain=INET:"
    + which)} would adopt (C{which} is C{name=NAME} or C{index=N}): the same
    C{LISTEN_FDS} and C{LISTEN_FDNAMES}, which Twisted reads (and removes
    from the environment) once, when C{twisted.internet.endpoints} is
    imported, so a process can take stream and datagram sockets alike.

    @raise KeyError: no socket of that name.
    @raise IndexError: no socket at that index.
    """
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

    endpoint = serverFromString(reactor, f"systemd:domain=INET:{which}")
    assert isinstance(endpoint, AdoptedStreamServerEndpoint)
    return int(endpoint.fileno)


# twistd's log observer.


def twistdLogObserver(serverOptions: Any) -> Any:
    """
    The observer twistd itself would log to for C{serverOptions}, from its
    own C{UnixAppLogger}, so echoplug follows twistd's rules for C{-n},
    C{-l}, C{--syslog} and daemons instead of repeating them: a
    C{FileLogObserver}, or a legacy observer (C{twisted.python.log}) for
    C{--syslog}.
    """
    from twisted.scripts._twistd_unix import UnixAppLogger

    return UnixAppLogger(serverOptions)._getLogObserver()


def observerFile(observer: FileLogObserver) -> IO[Any]:
    """The file a C{FileLogObserver} writes to."""
    return observer._outFile


# The lean reactors: Twisted's doPoll and doSelect without a log context
# per event. Each is Twisted's method line for line, but for the dispatch;
# tests/test__twisted.py pins the source of the methods copied.


def dispatch(reactor: Any, events: Iterable[tuple[int, int]]) -> None:
    """
    Run C{reactor._doReadOrWrite} for each C{(fd, event)} of a poll, as the
    stock C{doPoll} does but without C{log.callWithLogger}.

    An event that is only "readable" (nearly every event of an echo: each
    message, and the EOF) takes C{_doReadOrWrite}'s own steps for it,
    inlined: check the descriptor, C{doRead}, log an exception, disconnect
    on what C{doRead} returns. Any other event goes to C{_doReadOrWrite}.
    """
    selectables = reactor._selectables
    doReadOrWrite = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    readable = reactor._POLL_IN
    for fd, event in events:
        try:
            selectable = selectables[fd]
        except KeyError:
            # One selectable's handler disconnected another.
            continue
        try:
            if event == readable:
                # _doReadOrWrite for a read event with no hang-up, error or
                # write event, step for step.
                why: Any = None
                inRead = False
                try:
                    if selectable.fileno() == -1:
                        why = _NO_FILEDESC
                    else:
                        why = selectable.doRead()
                        inRead = True
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err()
                if why:
                    disconnect(selectable, why, inRead)
            else:
                doReadOrWrite(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            failed(selectable)


def failed(selectable: Any) -> None:
    """
    Log the exception being handled with the selectable's log prefix, as
    C{log.callWithLogger} would have. Call only from an C{except} block.
    """
    try:
        system = selectable.logPrefix()
    except BaseException:
        system = "(buggy logPrefix method)"
    log.err(system=system)


def epollDoPoll(self: Any, timeout: float | None) -> None:
    """C{EPollReactor.doPoll}, dispatching with L{dispatch}."""
    if timeout is None:
        timeout = -1  # Wait indefinitely.
    try:
        # At most as many events as descriptors, as the stock reactor.
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    dispatch(self, events)


def pollDoPoll(self: Any, timeout: float | None) -> None:
    """C{PollReactor.doPoll}, dispatching with L{dispatch}."""
    if timeout is not None:
        timeout = int(timeout * 1000)  # poll() takes milliseconds.
    try:
        events = self._poller.poll(timeout)
    except OSError as e:
        if e.args[0] == errno.EINTR:
            return
        raise
    dispatch(self, events)


def selectDoSelect(self: Any, timeout: float | None) -> None:
    """
    C{SelectReactor.doSelect}, calling C{_doReadOrWrite} directly instead of
    through C{log.callWithLogger}. The error handling is Twisted's, line for
    line.
    """
    try:
        r, w, _ = selectreactor._select(self._reads, self._writes, [], timeout)
    except ValueError:
        # Possibly a file descriptor has gone negative, or is >= FD_SETSIZE.
        self._preenDescriptors()
        return
    except TypeError:
        # Something totally invalid was passed.
        log.err()
        self._preenDescriptors()
        return
    except OSError as se:
        if se.args[0] in (0, 2):
            # Windows does this if it got an empty list.
            if (not self._reads) and (not self._writes):
                return
            raise
        if se.args[0] == errno.EINTR:
            return
        if se.args[0] == errno.EBADF:
            self._preenDescriptors()
            return
        raise

    doReadOrWrite = self._doReadOrWrite
    for selectables, method, fdset in (
        (r, "doRead", self._reads),
        (w, "doWrite", self._writes),
    ):
        for selectable in selectables:
            # Skip one that an earlier handler in this turn removed.
            if selectable not in fdset:
                continue
            try:
                doReadOrWrite(selectable, method)
            except KeyboardInterrupt:
                raise
            except BaseException:
                failed(selectable)


# pytest-twisted (the tests' reactor).


def installTestReactor(installer: Callable[[], None]) -> None:
    """
    Have pytest-twisted install its reactor with C{installer}, expecting
    whatever reactor that installs: pytest-twisted's documented hook for
    other reactors (C{reactor_installers}) calls this private function.
    """
    import pytest_twisted

    pytest_twisted._install_reactor(reactor_installer=installer, reactor_type=object)


# --workers: listening sockets shared between processes.


def sslContextFactory(endpoint: Any) -> Any:
    """The OpenSSL context factory of a C{ssl:} server endpoint."""
    return endpoint._sslContextFactory


class SharedUNIXPort(unix.Port):
    """
    A UNIX listening port adopted from a descriptor shared with other
    processes: stopping it closes this process's descriptor and leaves the
    socket's path in the file system to whoever bound it.
    """

    _shouldShutdown = False

    def connectionLost(self, reason: Any) -> None:
        # unix.Port.connectionLost would unlink the path (and unlock a lock
        # file, which an adopted port never has): skip to the TCP port's.
        tcp.Port.connectionLost(self, reason)


def adoptSharedUNIXPort(reactor: Any, fd: int, factory: ServerFactory,
                        backlog: int = 50) -> IListeningPort:
    """
    C{reactor.adoptStreamPort(fd, AF_UNIX, factory)}, with a
    L{SharedUNIXPort}. Like it, this dups C{fd}: close yours afterwards.
    """
    port: Any = SharedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
    port.backlog = backlog
    with socket.socket(fileno=os.dup(fd)) as s:
        path = s.getsockname()
    if isinstance(path, str) and path:  # in the file system, not abstract
        port.mode = stat.S_IMODE(os.stat(path).st_mode)  # chmod to what it is
    port.startListening()
    return port  # type: ignore[no-any-return]


def stopWithoutShutdown(port: Any) -> Any:
    """
    C{port.stopListening()}, closing this process's descriptor but without
    C{shutdown()}, which would stop the socket for every process sharing it.
    """
    port._shouldShutdown = False
    return port.stopListening()


def exclusiveWakeup(reactor: Any, port: Any) -> bool:
    """
    Re-register a listening port that the epoll reactor reads with
    C{EPOLLEXCLUSIVE}, so that a new connection wakes one of the workers
    waiting on the shared socket instead of every one (the others would find
    nothing to accept: a wasted wake-up and C{accept()} per worker per
    connection). Reads C{EPollReactor._poller} and C{_reads}. Call it again
    after each C{startReading()}: the reactor registers without the flag.

    @return: C{False} where it does not apply (poll, select, asyncio's own
        selector, an older kernel): every worker is woken, as before.
    """
    import select

    poller = getattr(reactor, "_poller", None)
    flag = getattr(select, "EPOLLEXCLUSIVE", None)
    if flag is None or not isinstance(poller, select.epoll):
        return False
    fd = port.fileno()
    if fd not in reactor._reads:
        return False
    poller.unregister(fd)
    try:
        poller.register(fd, select.EPOLLIN | flag)
    except OSError:
        poller.register(fd, select.EPOLLIN)  # a kernel without it (before 4.5)
        return False
    return True


# The buffer bound: read size, and learning when a send buffer has drained.

#: What Twisted reads per C{recv} and buffers before pausing a producer.
DEFAULT_BUFFER_SIZE: int = abstract.FileDescriptor.bufferSize


def setReadSize(transport: Any, size: int) -> None:
    """
    Make the socket transport under C{transport} read at most C{size} bytes
    per C{recv}, and pause its streaming producer once more than C{size}
    bytes wait to be sent: C{FileDescriptor} uses C{bufferSize} for both.
    """
    t = socketTransport(transport)
    if hasattr(t, "dataBuffer"):
        t.bufferSize = size


def watchDrain(transport: Any) -> None:
    """
    Have C{transport} call its streaming producer's C{resumeProducing} once
    its send buffer is empty, as C{FileDescriptor.doWrite} does after it has
    paused the producer, without pausing it: the flag is all doWrite reads.
    """
    transport.producerPaused = True


# Endpoint descriptions.


# UNIX listeners: peer names of 4 characters.


class _Name(tuple[Any, ...]):
    """A UNIX peer name, held in a 1-tuple so that its length is never 4."""

    __slots__ = ()


def _unwrap(name: Any) -> Any:
    return name[0] if type(name) is _Name else name


class _GuardedAccept:
    """
    A listening socket whose C{accept} hides a 4-character peer name in a
    L{_Name}. C{tcp.Port.doRead} takes any address of length 4 for an IPv6
    4-tuple and calls C{getnameinfo} on it, which raises C{TypeError} for a
    UNIX name such as C{"abcd"} or an abstract C{b"\\0abc"}, inside the
    accept loop: a traceback per connection, and the client reset.
    """

    __slots__ = ("_socket",)

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock

    def accept(self) -> tuple[socket.socket, Any]:
        skt, name = self._socket.accept()
        if len(name) == 4:
            name = _Name((name,))
        return skt, name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


class GuardedUNIXPort(unix.Port):
    """
    C{unix.Port} over a socket wrapped in L{_GuardedAccept}: unwraps the
    peer's name where C{doRead} hands it on, to C{_buildAddr} and to the
    transport class.
    """

    def _buildAddr(self, name: Any) -> Any:
        return super()._buildAddr(_unwrap(name))

    @staticmethod
    def transport(  # type: ignore[override]
            skt: Any, protocol: Any, client: Any, server: Any, sessionno: int,
            reactor: Any) -> Any:
        # The plain class, exactly: echoplug.eager recognises it.
        return unix.Server(skt, protocol, _unwrap(client), server, sessionno, reactor)


class GuardedSharedUNIXPort(GuardedUNIXPort, SharedUNIXPort):
    """L{GuardedUNIXPort}'s accept over a L{SharedUNIXPort} (a worker's adopted one)."""


_GUARDED: dict[type, type] = {unix.Port: GuardedUNIXPort,
                              SharedUNIXPort: GuardedSharedUNIXPort}


def guardUNIXAccept(port: Any) -> None:
    """
    Make a listening C{unix.Port} (however it was made: a C{unix:} endpoint,
    systemd, an adopted descriptor) accept clients bound to 4-character
    names. Any other port is left as it is.
    """
    guarded = _GUARDED.get(type(port))
    if guarded is None or not hasattr(port, "socket"):
        return
    port.__class__ = guarded
    port.socket = _GuardedAccept(port.socket)


# The lean TCP listener: Twisted's accept loop and server transport without
# the per-connection work an echo does not need (see LeanPort).


class LeanServer(tcp.Server):
    """
    C{tcp.Server} that builds its log prefix and C{repr} only when asked,
    closes with one system call fewer, and tells a clean close from an abort
    with C{isinstance}.

    Per connection, C{tcp.Server.__init__} formats a log prefix (asking
    zope whether the protocol provides C{ILoggingContext}) and a C{repr}
    string, which the lean reactors never read; C{Connection.connectionLost}
    calls C{Failure.check}, which names every class of the exception's MRO
    with C{reflect.qual}; and C{_closeSocket} calls C{shutdown(SHUT_RDWR)}
    before C{close()}. The socket is close-on-exec (Python accepts with
    C{SOCK_CLOEXEC}), so no other process holds it and C{close()} alone
    sends the FIN, as the comment in Twisted's C{_closeSocket} says; an
    abort still sets C{SO_LINGER} to send a reset. Everything else is
    C{tcp.Server}'s: reading, writing, half-close, producers, abort, TLS.
    """

    _shouldShutdown = False

    def __init__(self, sock: socket.socket, protocol: Any, client: tuple[Any, ...],
                 server: Any, sessionno: int, reactor: Any, peer: Any = None) -> None:
        # tcp.Server.__init__ and Connection.__init__, less logstr and repstr.
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = sock
        sock.setblocking(False)
        self.fileno = sock.fileno
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        # For repr(), which tcp.Server formats here: the port may be closed
        # (a drain) by the time anyone asks.
        self.portNumber = server._realPortNumber
        # The address the port gave the factory: getPeer() hands out the
        # same one instead of building another (an access line asks).
        self.peer = peer
        self.startReading()
        self.connected = 1

    def doRead(self) -> Any:
        # Connection.doRead with _dataReceived inlined: once per message.
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == errno.EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def getPeer(self) -> Any:
        peer = self.peer
        if peer is None:
            peer = self.peer = super().getPeer()
        return peer

    def logPrefix(self) -> str:
        try:
            return self._logstr
        except AttributeError:
            protocol = self.__dict__.get("protocol")
            if protocol is None:
                # Closed: connectionLost dropped the protocol, as Twisted's
                # does, and kept its class (Protocol.logPrefix's answer).
                prefix = self.protocolClass.__name__
            else:
                prefix = self._getLogPrefix(protocol)
            self._logstr: str = f"{prefix},{self.sessionno},{self.hostname}"
            return self._logstr

    @property
    def logstr(self) -> str:  # type: ignore[override]
        return self.logPrefix()

    #: The protocol's class, kept by connectionLost for the names above.
    protocolClass: type = object

    def __repr__(self) -> str:
        protocol = self.__dict__.get("protocol")
        name = (self.protocolClass if protocol is None else type(protocol)).__name__
        return f"<{name} #{self.sessionno} on {self.portNumber}>"

    def connectionLost(self, reason: Failure) -> None:
        # Connection.connectionLost, with isinstance for reason.check.
        if "socket" not in self.__dict__:
            return
        abstract.FileDescriptor.connectionLost(self, reason)
        self._closeSocket(not isinstance(reason.value, error.ConnectionAborted))
        protocol = self.protocol
        self.protocolClass = type(protocol)
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)


class _Replay:
    """
    A listening socket whose next C{accept()} raises C{error} (the one
    L{LeanPort}'s loop just had), then accepts as the socket does.
    """

    def __init__(self, sock: socket.socket, error: OSError) -> None:
        self._socket = sock
        self._error: OSError | None = error

    def accept(self) -> Any:
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._socket.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


class LeanPort(tcp.Port):
    """
    C{tcp.Port} whose accept loop does what Twisted's does for a connection
    that is accepted, in fewer steps, and hands every other case to
    Twisted's.

    Twisted's C{doRead} opens a buffering log context and a generator
    (C{_accept}) per wake-up, and Python's C{socket.accept} converts the
    family and type to enums for every connection. This loop calls the
    socket's C{_accept()} itself and wraps the descriptor with the family,
    type and protocol read once, then builds the address, the protocol and
    a L{LeanServer} as Twisted does, with the same session numbers, the
    same IPv6 scope handling and the same adaptive C{numberAccepts}. When
    C{accept} fails with anything but C{EAGAIN} (C{EMFILE}, C{EPERM},
    C{ECONNABORTED}...), it runs Twisted's C{doRead}, whose C{_accept}
    handles each of those (the reserved descriptor for C{EMFILE}).
    """

    transport = LeanServer
    #: Set by the listener that put --keepalive's options on this socket
    #: (L{keepaliveInherited}).
    keepaliveSet = False

    def doRead(self) -> None:
        try:
            sock: Any = self.socket
            accept = sock._accept
            kind = (sock.family, sock.type, sock.proto)
            factory: Any = self.factory
            reactor = self.reactor
            buildAddr = self._buildAddr
            limit = self.numberAccepts
            accepted = 0
            while accepted < limit:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    # Twisted's loop knows each error (EMFILE: its reserved
                    # descriptor; the others: a line, or a traceback): hand
                    # it this one, then it accepts whatever follows.
                    self.socket = _Replay(sock, e)
                    try:
                        tcp.Port.doRead(self)
                    finally:
                        self.socket = sock
                    return
                accepted += 1
                skt = socket.socket(*kind, fileno=fd)
                if len(addr) == 4:
                    # IPv6: keep the scope ID, as Twisted does.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST
                                              | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                peer = buildAddr(addr)
                protocol = factory.buildProtocol(peer)
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                protocol.makeConnection(LeanServer(skt, protocol, addr, self, s, reactor,
                                                   peer))
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            log.deferr()


def listeningSocket(port: Any) -> Any:
    """
    The socket a listening port accepts on (C{tcp.Port.socket}, set by
    C{startListening} or adoption; Twisted's ports have no C{getHandle}),
    or C{None}.
    """
    return getattr(port, "socket", None)


def keepaliveInherited(transport: Any) -> bool:
    """
    The connection under C{transport} (TLS or not) was accepted on a
    L{LeanPort} whose socket carries --keepalive's options, which Linux
    copies to every socket it accepts (C{tcp.Server.server} is the port).
    """
    server = getattr(socketTransport(transport), "server", None)
    return bool(getattr(server, "keepaliveSet", False))


def leanTCPAccept(port: Any) -> bool:
    """
    Make a listening C{tcp.Port} (exactly that class, however it was made:
    a C{tcp:} endpoint, systemd, an adopted descriptor) a L{LeanPort}, as
    L{guardUNIXAccept} does for UNIX ports. Return whether it did; any other
    port is left as it is.
    """
    if type(port) is not tcp.Port or port.transport is not tcp.Server:
        return False
    port.__class__ = LeanPort
    return True
