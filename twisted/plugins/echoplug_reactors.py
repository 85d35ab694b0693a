"""
echoplug's reactors for C{twistd -r}: Twisted's epoll, poll and select
reactors without a log context per event (see L{echoplug.reactors} for what
that saves and what it costs).

Like every reactor dropin, this imports only L{Reactor}: twistd reads it
before installing any reactor, so it must not import the reactor modules.
"""

from twisted.application.reactors import Reactor

echoplugEpoll = Reactor(
    "echoplug-epoll",
    "echoplug.reactors.epoll",
    "epoll(4) reactor without a log context per event (echoplug; fastest).",
)
echoplugPoll = Reactor(
    "echoplug-poll",
    "echoplug.reactors.poll",
    "poll(2) reactor without a log context per event (echoplug).",
)
echoplugSelect = Reactor(
    "echoplug-select",
    "echoplug.reactors.select",
    "select(2) reactor without a log context per event (echoplug).",
)
