# -*- test-case-name: tests.test__twisted -*-
"""
The private Twisted names echoplug reads, each behind one accessor, each
pinned in tests/test__twisted.py so that a Twisted upgrade that moves one
fails the tests instead of echoplug.

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
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory


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
