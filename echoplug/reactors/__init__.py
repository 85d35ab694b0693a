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
Twisted's that dispatches without the log context. The copies read the
reactors' private names, so they live in L{echoplug._twisted} (with
tests/test__twisted.py pinning the source of the methods copied, so a Twisted
upgrade that changes them fails the tests instead of being silently
shadowed); the classes here only assign them.

L{install} is how echoplug's own commands (C{echoplug-client}, the lab's load
client) take a C{--reactor} name: the one twistd's C{-r} takes.
"""

from __future__ import annotations

from typing import Any


def install(name: str | None, prog: str = "echoplug") -> Any:
    """
    Install the reactor named C{name} (as C{twistd -r} would: Twisted's and
    echoplug's lean ones), or leave the default for C{None}; return the
    reactor.

    @raise SystemExit: for an unknown name, with one line naming C{prog}.
    """
    if name is not None:
        from twisted.application.reactors import NoSuchReactor, installReactor

        try:
            installReactor(name)
        except NoSuchReactor:
            raise SystemExit(f"{prog}: no such reactor: {name!r}") from None
    from twisted.internet import reactor

    return reactor
