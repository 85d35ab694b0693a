# -*- test-case-name: tests.test__twisted -*-
"""
The one place where echoplug reads (or sets) names that Twisted keeps private,
or relies on Twisted code behaving just so. tests/test__twisted.py pins each
one, so an upgrade that changes them fails the tests instead of silently
losing data, limits or speed.

What is read, and why:

    C{FileDescriptor.dataBuffer}, C{offset}, C{_tempDataLen}
        L{pendingBytes}: bytes written but not yet sent (idle sweep,
        buffer bound).
    C{FileDescriptor.bufferSize}
        L{setReadSize}: both the size of each C{recv} and the send-buffer
        size above which a streaming producer is paused; the buffer bound
        lowers it per transport as the total nears the bound.
    C{FileDescriptor.producerPaused}
        L{watchDrain}: Twisted calls a registered streaming producer's
        C{resumeProducing} when the send buffer empties only if this flag is
        set; the buffer bound sets it to learn when a connection's buffer
        has drained.
    C{endpoints._parse}
        L{endpointArguments}: the arguments of an endpoint description, to
        add a default (C{backlog=}, C{mode=}) only where none was given.
    C{tcp.Port.doRead} treating a 4-item address as IPv6
        L{guardUNIXAccept}: a UNIX client bound to a 4-character name must
        not make the accept loop raise.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import abstract, endpoints

try:
    from twisted.internet import unix
except ImportError:  # pragma: no cover - platforms without AF_UNIX
    unix = None  # type: ignore[assignment]

#: What Twisted reads per C{recv} and buffers before pausing a producer.
DEFAULT_BUFFER_SIZE: int = abstract.FileDescriptor.bufferSize


def bottom(transport: Any) -> Any:
    """The socket transport under C{transport}: TLS wraps the TCP one."""
    while not hasattr(transport, "dataBuffer") and hasattr(transport, "transport"):
        transport = transport.transport
    return transport


def pendingBytes(transport: Any) -> int:
    """
    Bytes written but not yet sent, from the fields of Twisted's
    C{FileDescriptor} (every POSIX reactor, asyncio included); 0 if unknown.
    """
    t = bottom(transport)
    try:
        return len(t.dataBuffer) - t.offset + t._tempDataLen  # type: ignore[no-any-return]
    except AttributeError:
        return 0


def setReadSize(transport: Any, size: int) -> None:
    """
    Make the socket transport under C{transport} read at most C{size} bytes
    per C{recv}, and pause its producer once more than C{size} bytes wait to
    be sent: Twisted uses C{bufferSize} for both.
    """
    t = bottom(transport)
    if hasattr(t, "dataBuffer"):
        t.bufferSize = size


def watchDrain(transport: Any) -> None:
    """
    Ask C{transport} to call its streaming producer's C{resumeProducing}
    once its send buffer is empty, as it does after pausing the producer
    (C{FileDescriptor.doWrite}), without pausing it.
    """
    transport.producerPaused = True


def endpointArguments(description: str) -> tuple[list[str], dict[str, str]]:
    """The positional and keyword arguments of an endpoint description."""
    args, kw = endpoints._parse(description)  # type: ignore[attr-defined]
    return list(args), dict(kw)


class _Name(tuple):  # type: ignore[type-arg]
    """A UNIX peer name, held in a 1-tuple so that its length is never 4."""

    __slots__ = ()


def _unwrap(name: Any) -> Any:
    return name[0] if type(name) is _Name else name


class _GuardedAccept:
    """
    A listening socket whose C{accept} hides a 4-character peer name in a
    L{_Name}: C{tcp.Port.doRead} takes any address of length 4 for an IPv6
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


if unix is not None:

    class GuardedUNIXPort(unix.Port):
        """
        C{unix.Port} for a socket wrapped in L{_GuardedAccept}: it unwraps
        the peer's name where C{doRead} hands it on, to C{_buildAddr} and to
        the transport.
        """

        def _buildAddr(self, name: Any) -> Any:
            return super()._buildAddr(_unwrap(name))

        @staticmethod
        def transport(skt: Any, protocol: Any, client: Any, server: Any, sessionno: int,
                      reactor: Any) -> Any:
            # The plain class, exactly: echoplug.eager recognises it.
            return unix.Server(skt, protocol, _unwrap(client), server, sessionno, reactor)


def guardUNIXAccept(port: Any) -> None:
    """
    Make a listening C{unix.Port} (however it was made: a C{unix:} endpoint,
    systemd, an adopted descriptor) accept clients bound to 4-character
    names. Any other port is left as it is.
    """
    if unix is None or type(port) is not unix.Port or not hasattr(port, "socket"):
        return
    port.__class__ = GuardedUNIXPort
    port.socket = _GuardedAccept(port.socket)
