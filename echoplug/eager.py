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
UNIX) transport with nothing buffered, no paused producer, TLS off and
no close under way, it calls C{socket.send} directly and hands only the
remainder to C{transport.write}, so the transport's own buffering, producer
pausing (backpressure), half-close and abort logic see exactly what they
would have seen otherwise. Any other transport (TLS, wrapped by a
C{ProtocolWrapper}, a test's C{StringTransport}) gets its plain C{write}.

The reads of Twisted's internals that this takes (C{FileDescriptor}'s
buffers and close flags, C{TLS}, C{socket}) are in L{echoplug._twisted},
with the closure itself, so the per-message path has no extra call; this
module decides which transports get it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp

from echoplug import _twisted

#: Transport classes, exactly (not subclasses), whose write path is
#: C{FileDescriptor.write} over a plain stream socket: the server ends (an
#: echo, on Twisted's listener or echoplug's lean one) and the client ends
#: (the lab's load client).
PLAIN: tuple[type, ...] = (tcp.Server, _twisted.LeanServer, tcp.Client)
try:
    from twisted.internet import unix
except ImportError:  # pragma: no cover - platforms without AF_UNIX
    pass
else:
    PLAIN += (unix.Server, unix.Client)


def eagerWriter(transport: Any,
                queued: Callable[[], None] | None = None) -> Callable[[bytes], None]:
    """
    The function to write with on C{transport}: an eager one for a plain TCP
    or UNIX transport, else C{transport.write} itself.

    @param queued: called after an eager write that left bytes in the
        transport's empty send buffer (the kernel took only part), for
        the buffer bound; never on the fast path.
    """
    if type(transport) not in PLAIN or _twisted.usesTLS(transport):
        write: Callable[[bytes], None] = transport.write
        return write
    return _twisted.eagerWrite(transport, queued)


def loseConnection(transport: Any) -> None:
    """
    C{transport.loseConnection()}, done at once when a plain TCP or UNIX
    transport has nothing left to send and no producer: the same steps
    C{FileDescriptor} takes when its buffer is flushed (stop reading and
    writing, C{connectionLost} with C{ConnectionDone}), one reactor turn
    sooner. Anything else takes the ordinary path.
    """
    if type(transport) in PLAIN and not _twisted.usesTLS(transport) and _twisted.idle(transport):
        _twisted.closeNow(transport)
    else:
        transport.loseConnection()
