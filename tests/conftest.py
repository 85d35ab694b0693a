"""
Choose the reactor of the in-process (pytest-twisted) tests:
C{ECHOPLUG_TEST_REACTOR=NAME pytest} installs the reactor C{twistd -r NAME}
would (select, poll, epoll, asyncio, echoplug-epoll, ...). Unset, it is
pytest-twisted's default (epoll on Linux). The tests that start twistd choose
their reactors themselves (tests.support.REACTORS).

pytest-twisted installs its reactor in C{pytest_configure}, after this file is
imported, and only knows three names; so the "default" installer is replaced
here, as its documentation suggests for other reactors.

Also: a shell that starts pytest in the background (C{pytest &}, nohup, some
CI runners) leaves SIGINT ignored, and an ignored signal stays ignored across
exec, so every twistd the tests start would ignore SIGINT and Twisted would
not install its handler. The tests of SIGINT need the disposition a terminal
gives; an ignored SIGINT is reset here, before any child starts.
"""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted

from echoplug._twisted import installTestReactor

TEST_REACTOR = os.environ.get("ECHOPLUG_TEST_REACTOR", "")

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def installNamedReactor() -> None:
    from twisted.application.reactors import NoSuchReactor, installReactor

    def install() -> None:
        try:
            installReactor(TEST_REACTOR)
        except NoSuchReactor:
            raise pytest.UsageError(
                f"ECHOPLUG_TEST_REACTOR={TEST_REACTOR!r}: no such reactor") from None

    installTestReactor(install)


if TEST_REACTOR:
    pytest_twisted.reactor_installers["default"] = installNamedReactor
