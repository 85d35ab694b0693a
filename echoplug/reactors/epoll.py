# -*- test-case-name: tests.test_reactors -*-
"""
C{twistd -r echoplug-epoll}: Twisted's epoll reactor without a log context
per event (see L{echoplug.reactors}).
"""

from __future__ import annotations

import errno

from twisted.internet import epollreactor

from echoplug.reactors import dispatch


class LeanEPollReactor(epollreactor.EPollReactor):
    """
    L{epollreactor.EPollReactor} whose C{doPoll} dispatches with
    L{dispatch} instead of C{log.callWithLogger}.
    """

    def doPoll(self, timeout: float | None) -> None:
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

    doIteration = doPoll


def install() -> None:
    """Install the lean epoll reactor."""
    from twisted.internet.main import installReactor

    installReactor(LeanEPollReactor())


__all__ = ["LeanEPollReactor", "install"]
