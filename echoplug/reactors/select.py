# -*- test-case-name: tests.test_reactors -*-
"""
C{twistd -r echoplug-select}: Twisted's select reactor without a log context
per event (see L{echoplug.reactors}). It keeps select()'s limit: no
descriptor at or above FD_SETSIZE (1024).
"""

from __future__ import annotations

from twisted.internet import selectreactor

from echoplug import _twisted


class LeanSelectReactor(selectreactor.SelectReactor):
    """
    L{selectreactor.SelectReactor} whose C{doSelect} dispatches straight to
    C{_doReadOrWrite} instead of through C{log.callWithLogger}
    (L{echoplug._twisted.selectDoSelect}).
    """

    doSelect = _twisted.selectDoSelect
    doIteration = doSelect


def install() -> None:
    """Install the lean select reactor."""
    from twisted.internet.main import installReactor

    installReactor(LeanSelectReactor())


__all__ = ["LeanSelectReactor", "install"]
