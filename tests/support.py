"""
Helpers shared by the tests: start real C{twistd} processes, talk to them
over loopback sockets, and read their resource use from C{/proc}.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from echoplug.lab import procs

# Twisted's reactors and echoplug's lean ones (echoplug.reactors): every
# per-reactor test runs on each.
REACTORS = ["select", "poll", "epoll", "asyncio", "echoplug-select", "echoplug-poll",
            "echoplug-epoll"]
LISTENING = re.compile(r"listening on (?P<host>[^\s,]+):(?P<port>\d+), reactor=(?P<reactor>\S+)")


def twistdCommand() -> list[str]:
    """The twistd of the running interpreter (L{procs.twistdArgv})."""
    return procs.twistdArgv()


@dataclass
class Server:
    """A running server process and what its log has said so far."""

    proc: subprocess.Popen[str]
    port: int = 0
    reactor: str = ""
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "".join(self.lines)

    def waitFor(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a log line matches C{pattern}; return the match."""
        reader = self._reader
        m = procs.waitForLine(self.lines, pattern, timeout, lambda: self.proc.poll() is None
                              or (reader is not None and reader.is_alive()))
        if m is None:
            raise AssertionError(f"no log line matching {pattern!r}; log:\n{self.output()}")
        return m

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


PathLike = str | os.PathLike[str]


ROOT = procs.ROOT


def testEnv(extra: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment for a child process: this checkout first on
    C{PYTHONPATH}, so the child runs the code under test (and finds its
    dropin) even beside another installed copy of echoplug.
    """
    return procs.childEnv(extra)


def startProcess(argv: Sequence[str], cwd: PathLike, env: dict[str, str] | None = None,
                 pass_fds: Sequence[int] = ()) -> Server:
    env = testEnv(env)
    proc = subprocess.Popen(
        list(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, pass_fds=tuple(pass_fds), start_new_session=True,
    )
    server = Server(proc)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)

    server._reader = threading.Thread(target=pump, daemon=True)
    server._reader.start()
    return server


@contextlib.contextmanager
def twistd(reactor: str | None, *options: str, cwd: str | os.PathLike[str],
           env: dict[str, str] | None = None, wait: bool = True) -> Iterator[Server]:
    """
    Run C{twistd [-r reactor] -n --pidfile= echoplug OPTIONS} in C{cwd} (so
    the plugin is found from anywhere) and wait for its "listening on" line.
    Without a C{--port} option it listens on a free port on 127.0.0.1.
    """
    argv = twistdCommand()
    if reactor:
        argv += ["-r", reactor]
    argv += ["-n", "--pidfile=", "echoplug"]
    quiet = any(level in options for level in ("warn", "error"))
    port = 0
    if not any(o.startswith(("--port", "-p")) for o in options):
        # Port 0 and the "listening on" line avoid racing for a free port;
        # at levels that hide that line, take a free port and poll it.
        port = freePort() if quiet else 0
        argv += ["--port", f"tcp:{port}:interface=127.0.0.1"]
    argv += list(options)
    server = startProcess(argv, cwd, env)
    try:
        if wait and port:
            server.port = port
            waitForPort(server, port)
        elif wait:
            m = server.waitFor(LISTENING.pattern)
            server.port = int(m["port"])
            server.reactor = m["reactor"]
        yield server
    finally:
        server.stop()


freePort = procs.freePort


def waitForPort(server: Server, port: int, timeout: float = 10.0) -> None:
    try:
        listening = procs.waitForPort(port, timeout, lambda: server.proc.poll() is None)
    except TimeoutError:
        raise AssertionError(f"nothing listens on {port}:\n{server.output()}") from None
    assert listening, f"server exited:\n{server.output()}"


def stockEcho(reactor: str, cwd: PathLike) -> contextlib.AbstractContextManager[Server]:
    """
    Stock C{twisted.protocols.wire.Echo} under C{twistd -r reactor}, to show
    that a test fails on the naive server.
    """
    tac = Path(cwd) / "stock.tac"
    tac.write_text(
        "from twisted.application import service, strports\n"
        "from twisted.internet.protocol import Factory\n"
        "from twisted.protocols.wire import Echo\n"
        "from twisted.logger import Logger\n"
        "application = service.Application('stock')\n"
        "factory = Factory.forProtocol(Echo)\n"
        "class S(service.Service):\n"
        "    def startService(self):\n"
        "        from twisted.internet.endpoints import serverFromString\n"
        "        from twisted.internet import reactor\n"
        "        def up(port):\n"
        "            h = port.getHost()\n"
        "            Logger().info('listening on {h}:{p}, reactor=stock', h=h.host, p=h.port)\n"
        "        serverFromString(reactor, 'tcp:0:interface=127.0.0.1').listen(factory)"
        ".addCallback(up)\n"
        "S().setServiceParent(application)\n"
    )
    return _tac(reactor, tac, cwd)


@contextlib.contextmanager
def _tac(reactor: str, tac: Path, cwd: str | os.PathLike[str]) -> Iterator[Server]:
    server = startProcess([*twistdCommand(), "-r", reactor, "-n", "--pidfile=", "-y", str(tac)],
                          cwd)
    try:
        m = server.waitFor(LISTENING.pattern)
        server.port = int(m["port"])
        yield server
    finally:
        server.stop()


#: Resident set size of a process, from /proc/PID/status.
rssBytes = procs.rssBytes


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recvAll(sock: socket.socket, limit: int | None = None) -> bytes:
    """Read until EOF (or until C{limit} bytes)."""
    chunks = bytearray()
    while limit is None or len(chunks) < limit:
        data = sock.recv(1 << 16)
        if not data:
            break
        chunks += data
    return bytes(chunks)


def served(sock: socket.socket) -> bool:
    """True if the server echoes on C{sock}; False if it closed it unserved."""
    try:
        sock.sendall(b"ping")
        return sock.recv(4) == b"ping"
    except OSError:
        return False


def echoHalfClose(port: int, chunks: Sequence[bytes], timeout: float = 30.0) -> bytes:
    """
    Send C{chunks} one C{send} each, then C{shutdown(SHUT_WR)}, reading at the
    same time from another thread; return all that came back before EOF.
    """
    with connect(port, timeout=timeout) as s:
        return halfCloseOn(s, chunks, timeout)


def halfCloseOn(s: socket.socket, chunks: Sequence[bytes], timeout: float = 30.0) -> bytes:
    """L{echoHalfClose} on a socket already connected (TCP or UNIX)."""
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recvAll(s)), daemon=True)
    reader.start()
    for chunk in chunks:
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    reader.join(timeout)
    assert not reader.is_alive(), "no EOF from the server"
    return received[0]


def pushWithoutReading(port: int, total: int, measure: Callable[[], int],
                       stall: float = 1.0, deadline: float = 30.0) -> tuple[int, int]:
    """
    Write up to C{total} bytes and never read. Stop when the server has
    taken nothing for C{stall} seconds or after C{deadline}. Return the
    bytes pushed and what C{measure()} gave while the connection was still
    open, before it was reset.
    """
    block = b"x" * (1 << 20)
    pushed = 0
    with connect(port) as s:
        s.setblocking(False)
        end = time.monotonic() + deadline
        last = time.monotonic()
        while pushed < total and time.monotonic() < end:
            try:
                n = s.send(block[: min(len(block), total - pushed)])
            except BlockingIOError:
                if time.monotonic() - last > stall:
                    break
                time.sleep(0.005)
                continue
            pushed += n
            last = time.monotonic()
        measured = measure()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return pushed, measured


class NotifyReceiver:
    """
    A C{NOTIFY_SOCKET} bound by the test, as systemd binds its own: an
    C{AF_UNIX} datagram socket at a path, or in the abstract namespace for
    a name that starts with C{@}. C{.env} is what to give the child.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name[1:] if name.startswith("@") else name)
        self.messages: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.name}

    def waitFor(self, key: str, timeout: float = 10.0) -> str:
        """Read datagrams until one has the line C{key} (such as READY=1)."""
        for message in self.messages:
            if key in message.splitlines():
                return message
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.sock.recv(4096).decode("utf-8")
            except TimeoutError:
                break
            self.messages.append(message)
            if key in message.splitlines():
                return message
        raise AssertionError(f"no {key} in {self.messages!r}")

    def drain(self) -> list[str]:
        """Everything received so far without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode("utf-8"))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return self.messages

    def close(self) -> None:
        self.sock.close()


def quietly(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    """A client that exits with an echo unread resets the connection: that is fine."""
    with contextlib.suppress(ConnectionError):
        handle(conn)


@contextlib.contextmanager
def misbehaving(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback server that runs C{handle(conn)} for each connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=quietly, args=(handle, conn), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def plainEcho(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def flipLastByte(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data[:-1] + bytes([data[-1] ^ 1]))


def replayFirst(conn: socket.socket) -> None:
    """Echo the first message, then keep sending that one back."""
    with conn:
        first = conn.recv(64)
        conn.sendall(first)
        while data := conn.recv(65536):
            conn.sendall(first[: len(data)])


def cutAfterOne(conn: socket.socket) -> None:
    with conn:
        conn.sendall(conn.recv(64))
        conn.recv(64)
