# -*- test-case-name: tests.test_runner -*-
"""
Idle ("dead") connections for a point: opened, each echoed once (so the
server has accepted and registered it), then held open and silent.

Two limits shape how:

  - descriptors: a process may hold at most the hard C{RLIMIT_NOFILE}
    (20,000 here), and a point holds the idle connections of every server
    at once. So they are held by helper processes (C{python -m
    echoplug.lab.idle}), at most L{PER_HELPER} each, never by the bench;
  - ephemeral ports: one source address has about 28,000 of them, shared by
    every server of the point. So the connections come from several
    loopback source addresses in turn (L{SOURCES}: 127.0.0.2 and up, all of
    them local on Linux), bound with C{IP_BIND_ADDRESS_NO_PORT} so that the
    kernel picks the port at C{connect()}, per destination.

A helper prints C{ready} once every connection has echoed, or one line
C{error: ...}, and holds them until its stdin closes.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence

from echoplug.lab import procs

BATCH = 50  # connects in flight at once: below twistd's listen backlog of 50
PER_HELPER = 9_000  # connections per helper process, well under the hard limit
SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 10))
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2


def connect(port: int, source: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    return s


def openIdle(port: int, count: int, timeout: float = 10.0,
             sources: Sequence[str] = SOURCES) -> list[socket.socket]:
    """
    Open C{count} connections to C{port} from C{sources} in turn, echo one
    byte on each, and return them.
    """
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            batch = [connect(port, sources[(len(held) + i) % len(sources)], timeout)
                     for i in range(min(BATCH, count - len(held)))]
            held.extend(batch)
            for s in batch:
                s.sendall(b"i")
            for s in batch:
                if s.recv(1) != b"i":
                    raise OSError(f"idle connection {len(held)} got no echo")
    except BaseException:
        closeAll(held)
        raise
    return held


def closeAll(sockets: Iterable[socket.socket]) -> None:
    for s in sockets:
        s.close()


class Held:
    """The helper processes holding one server's idle connections."""

    def __init__(self, port: int, count: int, timeout: float) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            # One helper after another: together they would overflow the backlog.
            for share in shares(count):
                self.procs.append(self._start(port, share, timeout))
        except BaseException:
            self.close()
            raise

    def _start(self, port: int, count: int, timeout: float) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "echoplug.lab.idle", str(port), str(count), repr(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=procs.childEnv(), start_new_session=True)
        assert proc.stdout is not None
        # readline blocks: the helper's sockets time out, so it answers or exits.
        line = proc.stdout.readline().decode(errors="replace").strip()
        if line != "ready":
            self.procs.append(proc)
            raise OSError(line.removeprefix("error: ") or "the idle helper exited")
        return proc

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def shares(count: int) -> list[int]:
    """C{count} in helper-sized shares."""
    return [min(PER_HELPER, count - i) for i in range(0, count, PER_HELPER)]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or not args[0].isdigit() or not args[1].isdigit():
        print("usage: python -m echoplug.lab.idle PORT COUNT TIMEOUT", file=sys.stderr)
        return 2
    from echoplug.service import raiseNoFile

    raiseNoFile(None)
    try:
        held = openIdle(int(args[0]), int(args[1]), float(args[2]))
    except OSError as e:
        print(f"error: {e.strerror or e}", flush=True)
        return 1
    print("ready", flush=True)
    sys.stdin.buffer.read()  # until the runner closes our stdin
    closeAll(held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
