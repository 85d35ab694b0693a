"""
The private Twisted names that L{echoplug._twisted} reads, pinned: a Twisted
upgrade that renames one fails here, not in a worker.
"""

from __future__ import annotations

import inspect

from twisted.internet import endpoints, tcp, unix


def test_ssl_endpoint_keeps_its_context_factory() -> None:
    assert "self._sslContextFactory = sslContextFactory" in inspect.getsource(
        endpoints.SSL4ServerEndpoint.__init__)


def test_ports_adopt_from_a_descriptor() -> None:
    assert inspect.signature(unix.Port._fromListeningDescriptor).parameters.keys() >= {
        "reactor", "fd", "factory"}


def test_shutdown_on_close_is_a_flag() -> None:
    source = inspect.getsource(tcp._SocketCloser._closeSocket)
    assert "if self._shouldShutdown:" in source and "skt.shutdown(2)" in source
    assert tcp.Port._shouldShutdown is True


def test_unix_port_unlinks_and_chmods_its_path() -> None:
    # What SharedUNIXPort undoes: the unlink on stop, the chmod on start.
    assert "os.unlink(self._bindPath)" in inspect.getsource(unix.Port.connectionLost)
    start = inspect.getsource(unix.Port.startListening)
    assert "os.chmod(self._bindPath, self.mode)" in start
    assert "skt.listen(self.backlog)" in start
