# -*- test-case-name: tests.test_notify -*-
"""
The systemd notification protocol (sd_notify), without libsystemd.

Under C{Type=notify} systemd starts echoplug's dependants only once echoplug
says C{READY=1}, and a unit with C{WatchdogSec=} restarts it if the pings
stop. The protocol is one datagram of C{KEY=value} lines to the C{AF_UNIX}
socket named in C{NOTIFY_SOCKET} (a leading C{@} means the abstract
namespace), so it needs no dependency: L{notify} sends one, and
L{SystemdNotifier} is a child service of L{EchoService} that says:

  - C{READY=1} once every port listens and the reactor runs;
  - C{STOPPING=1} when shutdown begins (it is the last child added, so
    L{MultiService} stops it first, before the listeners and the drain);
  - C{WATCHDOG=1} every C{WATCHDOG_USEC/2} when C{WATCHDOG_USEC} is set and
    C{WATCHDOG_PID} is unset or ours: the ping comes from the reactor's own
    timer, so a blocked reactor misses it, which is what a watchdog is for;
  - C{STATUS=} with the connection counts (C{systemctl status} shows it), on
    the same timer and only when they changed: nothing on the per-connection
    path.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

if TYPE_CHECKING:
    from echoplug.service import EchoService

#: Seconds between C{STATUS=} updates when no watchdog asks for more often.
STATUS_INTERVAL = 5.0


class NotifyError(Exception):
    """C{NOTIFY_SOCKET} cannot be used (bad address, or the send failed)."""


def socketAddress(name: str) -> str:
    """
    The C{AF_UNIX} address for a C{NOTIFY_SOCKET} value: an absolute path, or
    C{@name} for the abstract namespace (a leading NUL byte to the kernel).

    @raise NotifyError: for anything else (systemd also accepts C{vsock:}
        addresses, which echoplug does not speak).
    """
    if name.startswith("@") and len(name) > 1:
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    raise NotifyError(f"NOTIFY_SOCKET={name!r} is neither an absolute path nor an @abstract name")


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{state} (one or more C{KEY=value} lines) to the service manager.

    @return: C{False} if C{NOTIFY_SOCKET} is not set (not under systemd),
        C{True} once the datagram is sent.
    @raise NotifyError: if the address is unusable or the send fails.
    """
    environ = os.environ if environ is None else environ
    name = environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    address = socketAddress(name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        # Never block the reactor on a full receive queue: systemd reads its
        # notifications promptly, and a lost status line is harmless.
        s.setblocking(False)
        try:
            s.sendto(state.encode("utf-8"), address)
        except OSError as e:
            raise NotifyError(f"cannot notify {name}: {e.strerror or e}") from None
    return True


def watchdogInterval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between C{WATCHDOG=1} pings: half of C{WATCHDOG_USEC}, as
    sd_watchdog_enabled(3) advises, or C{None} if the watchdog is off or
    meant for another process (C{WATCHDOG_PID} set and not C{pid}).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 2e6


class SystemdNotifier(Service):
    """
    Tell systemd about an L{EchoService}'s lifecycle; see the module
    docstring. Add it to the service last, with L{fromEnvironment}.

    @ivar sent: every state sent, oldest first (for tests and debugging).
    """

    log = Logger()
    name = "systemd-notify"

    def __init__(
        self,
        service: EchoService,
        environ: Mapping[str, str],
        watchdog: float | None = None,
        statusInterval: float = STATUS_INTERVAL,
    ) -> None:
        self.service = service
        self.environ = dict(environ)
        self.watchdog = watchdog
        interval = statusInterval if watchdog is None else min(watchdog, statusInterval)
        self.interval = interval
        self.sent: list[str] = []
        self.ready = False
        self.status = ""
        self._tick: LoopingCall | None = None
        self._failed = False

    @classmethod
    def fromEnvironment(
        cls, service: EchoService, environ: Mapping[str, str] | None = None,
        pid: int | None = None,
    ) -> SystemdNotifier | None:
        """
        A notifier for C{service} if C{NOTIFY_SOCKET} is set, else C{None}.

        @raise NotifyError: if C{NOTIFY_SOCKET} is not an address echoplug
            can use, so that a misconfigured unit fails at start-up with one
            line instead of timing out waiting for C{READY=1}.
        """
        environ = os.environ if environ is None else environ
        name = environ.get("NOTIFY_SOCKET")
        if not name:
            return None
        socketAddress(name)
        pid = os.getpid() if pid is None else pid
        return cls(service, environ, watchdogInterval(environ, pid))

    def send(self, *lines: str) -> None:
        state = "\n".join(lines)
        try:
            notify(state, self.environ)
        except NotifyError as e:
            if not self._failed:  # one warning, not one per tick
                self._failed = True
                self.log.warn("{error}", error=str(e))
            return
        self.sent.append(state)

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        # Every listener binds in privilegedStartService, so this usually
        # fires at once; READY=1 still waits for the reactor to run.
        self.service.whenListening().addCallback(
            lambda ports: reactor.callWhenRunning(self._ready, ports)
        )

    def _ready(self, ports: list[Any]) -> None:
        if not self.running:
            return
        self.ready = True
        self.status = self.statusLine()
        self.send("READY=1", f"STATUS={self.status}")
        self.log.info("told systemd READY=1 ({count} listening; {what} every {interval:g}s)",
                      count=len(ports), interval=self.interval,
                      what="watchdog and status" if self.watchdog else "status")
        self._tick = LoopingCall(self.tick)
        self._tick.start(self.interval, now=False)

    def tick(self) -> None:
        """Ping the watchdog if it is on, and send the status if it changed."""
        lines = ["WATCHDOG=1"] if self.watchdog is not None and self.healthy() else []
        status = self.statusLine()
        if status != self.status:
            self.status = status
            lines.append(f"STATUS={status}")
        if lines:
            self.send(*lines)

    def healthy(self) -> bool:
        """Whether the watchdog may be pinged: this process runs, so yes."""
        return True

    def statusLine(self) -> str:
        factory = self.service.factory
        return (f"connections: {len(factory.connections)} open, {factory.accepted} accepted, "
                f"{getattr(factory, 'refused', 0)} refused")

    def stopService(self) -> None:
        super().stopService()
        # systemd arms the watchdog only while the unit is running, and
        # STOPPING=1 ends that state, so the pings can stop here, before a
        # drain that may outlast WatchdogSec.
        if self._tick is not None and self._tick.running:
            self._tick.stop()
        self._tick = None
        self.send("STOPPING=1", f"STATUS=stopping, {self.statusLine()}")
