"""
Tests of L{echoplug.service}'s drain on SIGTERM for connections that the
kernel had already completed but echoplug had not yet accepted: they are
accepted before the port closes, and echoed, instead of being reset.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

import pytest

from tests.support import REACTORS, freePort, twistd

#: More than one doRead() accepts (tcp.Port.numberAccepts starts at 100),
#: so that some connections are still queued when the reactor sees SIGTERM.
CLIENTS = 400


def connectAll(port: int, n: int, deadline: float) -> list[socket.socket]:
    """Open C{n} connections that each send a line and half-close."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    pending = {s.fileno(): s for s in socks}
    poller = select.poll()  # not select(): no FD_SETSIZE in the way
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(500):
            poller.unregister(fd)
            del pending[fd]
    assert not pending, f"{len(pending)} connections never completed"
    for i, s in enumerate(socks):
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        s.send(f"client {i}\n".encode())
        s.shutdown(socket.SHUT_WR)
    return socks


def readAll(socks: list[socket.socket], deadline: float) -> tuple[dict[int, bytes], int]:
    """Read every socket to EOF; return what each got, and how many were reset."""
    got = {i: b"" for i in range(len(socks))}
    open_ = dict(enumerate(socks))
    index = {s.fileno(): i for i, s in open_.items()}
    poller = select.poll()
    for fd in index:
        poller.register(fd, select.POLLIN)
    reset = 0
    while open_ and time.monotonic() < deadline:
        for fd, _ in poller.poll(500):
            i = index[fd]
            s = open_[i]
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data, reset = b"", reset + 1
            if data:
                got[i] += data
            else:
                poller.unregister(fd)
                s.close()
                del open_[i]
    for s in open_.values():
        s.close()
    return got, reset


@pytest.mark.slow
@pytest.mark.parametrize("reactorName", REACTORS)
def test_connections_queued_at_sigterm_are_served(tmp_path, reactorName: str) -> None:
    port = freePort()
    with twistd(reactorName, "--port", f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                "--drain-timeout", "20", "--log-level", "info", cwd=tmp_path) as server:
        os.kill(server.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            socks = connectAll(port, CLIENTS, deadline)
            # The kernel has completed every handshake and holds each line:
            # nothing is accepted yet. Stop with all of them queued.
            os.kill(server.pid, signal.SIGTERM)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        got, reset = readAll(socks, deadline)
        assert server.proc.wait(30) == -signal.SIGTERM
    wrong = [i for i, data in got.items() if data != f"client {i}\n".encode()]
    assert (reset, len(wrong)) == (0, 0), f"{reset} reset, {len(wrong)} not echoed:\n" + \
        "".join(line for line in server.lines if "drain" in line or "accepted" in line)
