# -*- test-case-name: tests.test_reactors -*-
"""
C{twistd -r echoplug-epoll}: Twisted's epoll reactor without a log context
per event (see L{echoplug.reactors}).
"""

from __future__ import annotations

from twisted.internet import epollreactor

from echoplug import _twisted


class LeanEPollReactor(epollreactor.EPollReactor):
    """
    L{epollreactor.EPollReactor} whose C{doPoll} dispatches straight to
    C{_doReadOrWrite} instead of through C{log.callWithLogger}
    (L{echoplug._twisted.epollDoPoll}).
    """

    doPoll = _twisted.epollDoPoll
    doIteration = doPoll


def install() -> None:
    """Install the lean epoll reactor."""
    from twisted.internet.main import installReactor

    installReactor(LeanEPollReactor())


__all__ = ["LeanEPollReactor", "install"]
