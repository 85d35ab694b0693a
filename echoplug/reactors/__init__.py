# -*- test-case-name: tests.test_reactors -*-
"""
Lean reactors: Twisted's epoll, poll and select reactors without a log
context per event.

For every ready descriptor the stock posix reactors call
C{log.callWithLogger(selectable, ...)}: it asks the transport for its
C{logPrefix()}, copies the current log context and runs the callback inside a
new one, only so that legacy C{twisted.python.log} messages emitted during the
callback carry a C{system} such as C{"Echo,3,127.0.0.1"}. For an echo server
that is a third of the CPU time per message. The lean reactors dispatch
straight to the reactor's own C{_doReadOrWrite}, which already catches a
failing C{doRead}/C{doWrite}, logs it and disconnects that one connection.

Trade-off: legacy log lines and tracebacks emitted while handling I/O show
C{[-]} instead of the connection's log prefix. echoplug's own lines (the
access log, the start-up line) use C{twisted.logger} with a namespace and are
unchanged. An exception that escapes C{_doReadOrWrite} itself (a buggy
C{connectionLost}) is logged with the connection's prefix, as before.

Chosen with C{twistd -r echoplug-epoll} (or C{echoplug-poll},
C{echoplug-select}); the dropin is C{twisted/plugins/echoplug_reactors.py}.
Patching Twisted's reactors in place is not an option: these are separate
classes and nothing changes unless one of them is chosen.

Each subclass replaces one method (C{doPoll} or C{doSelect}) with a copy of
Twisted's that dispatches with L{dispatch}; tests/test_reactors.py pins the
source of the methods copied, so a Twisted upgrade that changes them fails
the tests instead of being silently shadowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.python import log


def dispatch(reactor: Any, events: Iterable[tuple[int, int]]) -> None:
    """
    Run C{reactor._doReadOrWrite} for each C{(fd, event)} of a poll, as the
    stock C{doPoll} does but without C{log.callWithLogger}.
    """
    selectables = reactor._selectables
    doReadOrWrite = reactor._doReadOrWrite
    for fd, event in events:
        try:
            selectable = selectables[fd]
        except KeyError:
            # One selectable's handler disconnected another.
            continue
        try:
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
