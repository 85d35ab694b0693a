# -*- test-case-name: tests.test_reactors -*-
"""
C{twistd -r echoplug-select}: Twisted's select reactor without a log context
per event (see L{echoplug.reactors}). It keeps select()'s limit: no
descriptor at or above FD_SETSIZE (1024).
"""

from __future__ import annotations

from errno import EBADF, EINTR

from twisted.internet import selectreactor
from twisted.python import log

from echoplug.reactors import failed


class LeanSelectReactor(selectreactor.SelectReactor):
    """
    L{selectreactor.SelectReactor} whose C{doSelect} calls
    C{_doReadOrWrite} directly instead of through C{log.callWithLogger}.
    """

    def doSelect(self, timeout: float | None) -> None:
        # The error handling is Twisted's, line for line.
        try:
            r, w, _ = selectreactor._select(self._reads, self._writes, [], timeout)
        except ValueError:
            # Possibly a file descriptor has gone negative, or is >= FD_SETSIZE.
            self._preenDescriptors()
            return
        except TypeError:
            # Something totally invalid was passed.
            log.err()
            self._preenDescriptors()
            return
        except OSError as se:
            if se.args[0] in (0, 2):
                # Windows does this if it got an empty list.
                if (not self._reads) and (not self._writes):
                    return
                raise
            if se.args[0] == EINTR:
                return
            if se.args[0] == EBADF:
                self._preenDescriptors()
                return
            raise

        doReadOrWrite = self._doReadOrWrite
        for selectables, method, fdset in (
            (r, "doRead", self._reads),
            (w, "doWrite", self._writes),
        ):
            for selectable in selectables:
                # Skip one that an earlier handler in this turn removed.
                if selectable not in fdset:
                    continue
                try:
                    doReadOrWrite(selectable, method)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    failed(selectable)

    doIteration = doSelect


def install() -> None:
    """Install the lean select reactor."""
    from twisted.internet.main import installReactor

    installReactor(LeanSelectReactor())


__all__ = ["LeanSelectReactor", "install"]
