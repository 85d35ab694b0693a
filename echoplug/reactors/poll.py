# -*- test-case-name: tests.test_reactors -*-
"""
C{twistd -r echoplug-poll}: Twisted's poll reactor without a log context per
event (see L{echoplug.reactors}).
"""

from __future__ import annotations

import errno

from twisted.internet import pollreactor

from echoplug.reactors import dispatch


class LeanPollReactor(pollreactor.PollReactor):
    """
    L{pollreactor.PollReactor} whose C{doPoll} dispatches with L{dispatch}
    instead of C{log.callWithLogger}.
    """

    def doPoll(self, timeout: float | None) -> None:
        if timeout is not None:
            timeout = int(timeout * 1000)  # poll() takes milliseconds.
        try:
            events = self._poller.poll(timeout)
        except OSError as e:
            if e.args[0] == errno.EINTR:
                return
            raise
        dispatch(self, events)

    doIteration = doPoll


def install() -> None:
    """Install the lean poll reactor."""
    from twisted.internet.main import installReactor

    installReactor(LeanPollReactor())


__all__ = ["LeanPollReactor", "install"]
