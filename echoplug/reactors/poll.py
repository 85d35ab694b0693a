# -*- test-case-name: tests.test_reactors -*-
"""
C{twistd -r echoplug-poll}: Twisted's poll reactor without a log context per
event (see L{echoplug.reactors}).
"""

from __future__ import annotations

from twisted.internet import pollreactor

from echoplug import _twisted


class LeanPollReactor(pollreactor.PollReactor):
    """
    L{pollreactor.PollReactor} whose C{doPoll} dispatches straight to
    C{_doReadOrWrite} instead of through C{log.callWithLogger}
    (L{echoplug._twisted.pollDoPoll}).
    """

    doPoll = _twisted.pollDoPoll
    doIteration = doPoll


def install() -> None:
    """Install the lean poll reactor."""
    from twisted.internet.main import installReactor

    installReactor(LeanPollReactor())


__all__ = ["LeanPollReactor", "install"]
