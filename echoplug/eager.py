# -*- test-case-name: tests.test_eager -*-
"""
Eager writes: send an echo at once instead of on the reactor's next turn.

Twisted's C{FileDescriptor.write} only appends to a buffer and asks the
reactor to watch the socket for writability; the C{send()} happens on a later
reactor turn. For an echo server that is an extra loop iteration per message
and, on epoll, two C{epoll_ctl} calls: most of the gap between stock
C{wire.Echo} and stdlib asyncio, which tries C{send()} at once.

L{loseConnection} is the same idea for the end of a half-closed echo: when
nothing is left to send it closes at once, instead of asking the reactor for
writability only to learn on the next turn that the buffer is empty (one
reactor turn and two C{epoll_ctl} calls per connection).

L{eagerWriter} returns a write function for a transport. On a plain TCP (or
UNIX) server transport with nothing buffered, no paused producer, TLS off and
no close under way, it calls C{socket.send} directly and hands only the
remainder to C{transport.write}, so the transport's own buffering, producer
pausing (backpressure), half-close and abort logic see exactly what they
would have seen otherwise. Any other transport (TLS, wrapped by a
C{ProtocolWrapper}, a test's C{StringTransport}) gets its plain C{write}.

It reads a few of C{FileDescriptor}'s attributes (C{dataBuffer},
C{_tempDataBuffer}, C{producerPaused}, C{disconnecting}, C{_aborting},
C{_writeDisconnecting}, C{TLS}, C{socket}). They have been stable for over a
decade; tests/test_eager.py pins each one, so a Twisted upgrade that changes
them fails the tests instead of silently losing data or speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure

try:
    from twisted.internet import unix
except ImportError:  # pragma: no cover - platforms without AF_UNIX
    unix = None  # type: ignore[assignment]

#: Transport classes, exactly (not subclasses), whose write path is
#: C{FileDescriptor.write} over a plain stream socket.
PLAIN: tuple[type, ...] = (tcp.Server,) + ((unix.Server,) if unix is not None else ())


def eagerWriter(transport: Any) -> Callable[[bytes], None]:
    """
    The function to write with on C{transport}: an eager one for a plain TCP
    or UNIX server transport, else C{transport.write} itself.
    """
    if type(transport) not in PLAIN or transport.TLS:
        return transport.write  # type: ignore[no-any-return]
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

    return eagerWrite


def loseConnection(transport: Any) -> None:
    """
    C{transport.loseConnection()}, done at once when a plain TCP or UNIX
    transport has nothing left to send and no producer: the same steps
    C{FileDescriptor} takes when its buffer is flushed (stop reading and
    writing, C{connectionLost} with C{ConnectionDone}), one reactor turn
    sooner. Anything else takes the ordinary path.
    """
    if (type(transport) in PLAIN and not transport.TLS and transport.connected
            and transport.producer is None and not transport.dataBuffer
            and not transport._tempDataBuffer and not transport.disconnecting
            and not transport._aborting and not transport._writeDisconnecting):
        transport.stopReading()
        transport.stopWriting()
        transport.connectionLost(Failure(main.CONNECTION_DONE))
    else:
        transport.loseConnection()
