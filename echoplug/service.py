# -*- test-case-name: tests.test_service -*-
"""
The service: listeners and the lifecycle of one echoplug process.

L{EchoService} is a L{MultiService} of L{Listener}s that share one
L{EchoFactory}. A listener binds in C{privilegedStartService}, before twistd
drops privileges, and turns a port that cannot be bound into one line and a
non-zero exit instead of a traceback.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from echoplug.factory import EchoFactory
from echoplug.logs import formatAddress


def reactorName(reactor: object) -> str:
    """
    The short name (as given to C{twistd -r}) of the installed reactor,
    found through the same reactor plugins twistd reads, so reactors that
    other packages ship are named too. Falls back to the class name.
    """
    from twisted.application.reactors import getReactorTypes

    module = type(reactor).__module__
    for installer in getReactorTypes():
        if installer.shortName != "default" and installer.moduleName == module:
            return installer.shortName
    return type(reactor).__name__


class Listener(Service):
    """
    Listen on one endpoint with the shared factory.

    @ivar ready: fires with the listening port once it listens.
    """

    log = Logger(namespace="echoplug")

    def __init__(
        self, description: str, endpoint: IStreamServerEndpoint, factory: EchoFactory
    ) -> None:
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self.ready: defer.Deferred[IListeningPort] = defer.Deferred()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failed: list[Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failed.append)
        if failed:
            # TCP, UNIX and systemd endpoints listen at once, so a port in
            # use shows up here, before the reactor runs: exit with one line.
            raise SystemExit(f"echoplug: cannot listen on {self.description}: "
                             f"{failed[0].getErrorMessage()}")

    def startService(self) -> None:
        if self.port is None and not self.ready.called:
            self.privilegedStartService()
        super().startService()

    def _listening(self, port: IListeningPort) -> None:
        from twisted.internet import reactor

        self.port = port
        name = reactorName(reactor)
        self.log.info(
            "listening on {address}, reactor={reactor} ({cls})",
            address=formatAddress(port.getHost()),
            reactor=name,
            cls=type(reactor).__name__,
        )
        self.ready.callback(port)

    def stopService(self) -> defer.Deferred[Any] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)


class EchoService(MultiService):
    """
    One echoplug server: its listeners and the factory they share.
    """

    def __init__(self, factory: EchoFactory, logObserver: ILogObserver | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.logObserver = logObserver

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes an Application (a Componentized) and starts logging to
        # its ILogObserver component if it has one: the documented hook for a
        # custom observer, and the only one a plugin can reach.
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def listen(self, description: str, endpoint: IStreamServerEndpoint) -> Listener:
        listener = Listener(description, endpoint, self.factory)
        listener.setServiceParent(self)
        return listener

    @property
    def listeners(self) -> list[Listener]:
        return [s for s in self if isinstance(s, Listener)]

    def whenListening(self) -> defer.Deferred[list[IListeningPort]]:
        """Fires with every listening port, once all of them listen."""
        return defer.gatherResults([listener.ready for listener in self.listeners])
