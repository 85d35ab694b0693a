# -*- test-case-name: tests.test_servers -*-
"""
The servers under test, each its own process, and their CPU time and RSS.

  - C{echoplug}: C{twistd -r REACTOR -n --pidfile= echoplug --port ...}, with
    the lab's server arguments (C{--log-level warn} unless told otherwise);
  - C{wire-echo}: stock C{twisted.protocols.wire.Echo} under the same
    C{twistd -r REACTOR} (L{echoplug.lab.wireecho});
  - C{asyncio}: the stdlib asyncio echo (L{echoplug.lab.asyncioecho}), on
    its own event loop whatever the reactor;
  - C{uvloop}: the same asyncio echo on uvloop's event loop (libuv), when
    uvloop is installed (it is not a dependency of echoplug);
  - C{c-epoll}: a plain epoll echo server in C (C{cecho.c}), the floor;
  - C{gevent}, C{tornado}, C{trio}: what a Python user might pick instead
    of Twisted, each its library's own echo in a few lines
    (L{echoplug.lab.peers}), when the library is installed (the C{bench}
    extra installs all three);
  - C{node}: Node.js C{net} (C{nodeecho.js}), when C{node} is on the PATH.

All but the first two are standalone: they run once per point, not per reactor,
and their "reactor" column says what they run on (L{STANDALONE}).

The reactor name goes to C{twistd -r} as it is, so a reactor that another
package adds through a Twisted reactor plugin works without changes here.

A server listens on a port the lab picked free on 127.0.0.1 and is ready once
it accepts a connection: at C{--log-level warn} echoplug says nothing on
start-up. The rare port taken in between is retried with another one. Its
output goes to a log file, never to a pipe nobody reads (a full pipe would
stop the server).

CPU time is utime + stime from C{/proc/PID/stat}: all the time the kernel
billed to the server process, in user space and in system calls, summed over
the process and everything under it (an echoplug with C{--workers} is a
parent and N workers). Such an echoplug is ready once it says C{READY=1} on
a C{NOTIFY_SOCKET} the lab binds: its port accepts as soon as the parent
binds it, before any worker does. Its
wake-ups are its poller calls (C{select}, C{poll}, C{epoll_wait} and their
kin), counted by a small preloaded shared object (C{pollcount.c}) into a
file beside its log. Its RSS is summed over the same process tree.

For the C{udp} workload each kind serves UDP on its port instead: echoplug
with C{--port udp:PORT}, asyncio and uvloop with the C{DatagramProtocol}
echo, c-epoll with C{cudpecho.c} (epoll, C{recvfrom}, C{sendto}); there is no
UDP wire-echo. A UDP server is ready once it echoes a probe datagram.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from echoplug.lab import procs

KINDS = ("echoplug", "wire-echo", "asyncio", "uvloop", "c-epoll", "gevent", "tornado", "trio",
         "node")
STDLIB = "stdlib"  # the reactor column of the asyncio peer: its own event loop
#: The peers with an event loop of their own, and their reactor column.
STANDALONE = {"asyncio": STDLIB, "uvloop": "uvloop", "c-epoll": "C", "gevent": "libev",
              "tornado": "asyncio", "trio": "trio", "node": "libuv"}
#: The peers that need something echoplug does not depend on: the module to import.
OPTIONAL = {"uvloop": "uvloop", "gevent": "gevent", "tornado": "tornado", "trio": "trio"}


def missing(kind: str) -> str | None:
    """Why peer C{kind} cannot run here (one phrase), or None if it can."""
    import importlib.util
    import shutil

    if kind in OPTIONAL and importlib.util.find_spec(OPTIONAL[kind]) is None:
        return f"{OPTIONAL[kind]} is not installed (pip install {OPTIONAL[kind]})"
    if kind == "node" and shutil.which("node") is None:
        return "node is not on the PATH"
    return None


class ServerError(Exception):
    """A server that would not start or died; the message is one line."""


def cpuSeconds(pid: int) -> float:
    """
    The CPU time of process C{pid} and of every process under it, in
    seconds (L{procs.treeCpuSeconds}): an echoplug with C{--workers} is a
    parent and its workers, and the workers do the echoing.
    """
    try:
        return procs.treeCpuSeconds(pid)
    except OSError as e:
        raise ServerError(f"cannot read the CPU time of process {pid}: {e.strerror}") from None


def rssBytes(pid: int) -> int:
    """
    The resident set size of process C{pid} and of every process under it,
    in bytes (L{procs.treeRssBytes}), as L{cpuSeconds} sums their CPU time.
    """
    try:
        return procs.treeRssBytes(pid)
    except OSError as e:
        raise ServerError(f"cannot read the RSS of process {pid}: {e.strerror}") from None


def label(kind: str, reactor: str) -> str:
    """How a server is named in tables and plots."""
    return f"{kind} ({reactor})" if kind in STANDALONE else f"{kind}/{reactor}"


@dataclass
class Server:
    """One running server process."""

    kind: str
    reactor: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)
    #: Where an echoplug with --workers says READY=1, once every worker
    #: accepts (its port accepts sooner: the parent binds it).
    notify: socket.socket | None = None
    transport: str = "tcp"  # or "udp"
    calls: Path | None = None  # the poller-call counter (L{counted})

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def name(self) -> str:
        return label(self.kind, self.reactor)

    def cpuSeconds(self) -> float:
        return cpuSeconds(self.pid)

    def rssBytes(self) -> int:
        return rssBytes(self.pid)

    def wakeups(self) -> int:
        """
        The server's poller calls so far, from its counter file (L{counted});
        0 when they are not counted here.
        """
        try:
            return int.from_bytes(self.calls.read_bytes()[:8], "little") if self.calls else 0
        except OSError:
            return 0  # not mapped yet: nothing counted

    def alive(self) -> bool:
        return self.proc.poll() is None

    def lastWords(self) -> str:
        """The last line the server logged, for a one-line error."""
        try:
            lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        # twistd ends a bad -r with a hint; the reason is the line before it.
        lines = [line for line in lines if line and not line.startswith("See the list of")]
        return lines[-1] if lines else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.notify is not None:
            self.notify.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def command(kind: str, reactor: str, port: int, serverArgs: Sequence[str],
            transport: str = "tcp") -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment that start C{kind} on C{port}."""
    if transport == "udp":
        return udpCommand(kind, reactor, port, serverArgs)
    if kind == "echoplug":
        return ([*procs.twistdArgv(), "-r", reactor, "-n", "--pidfile=", "echoplug",
                 "--port", f"tcp:{port}:interface=127.0.0.1", *serverArgs], {})
    if kind == "wire-echo":
        tac = Path(__file__).with_name("wireecho.py")
        return ([*procs.twistdArgv(), "-r", reactor, "-n", "--pidfile=", "-y", str(tac)],
                {"ECHOPLUG_LAB_PORT": str(port)})
    if kind == "asyncio":
        return [sys.executable, "-m", "echoplug.lab.asyncioecho", str(port)], {}
    if kind == "uvloop":
        return [sys.executable, "-m", "echoplug.lab.asyncioecho", "--uvloop", str(port)], {}
    if kind in ("gevent", "tornado", "trio"):
        return [sys.executable, "-m", "echoplug.lab.peers", kind, str(port)], {}
    if kind == "node":
        return ["node", str(Path(__file__).with_name("nodeecho.js")), str(port)], {}
    if kind == "c-epoll":
        from echoplug.lab import cbuild

        try:
            return [str(cbuild.build("cecho")), str(port)], {}
        except cbuild.BuildError as e:
            raise ServerError(str(e)) from None
    raise ValueError(f"unknown server kind {kind!r}")


def udpCommand(kind: str, reactor: str, port: int,
               serverArgs: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """L{command} for the C{udp} workload."""
    if kind == "echoplug":
        return ([*procs.twistdArgv(), "-r", reactor, "-n", "--pidfile=", "echoplug",
                 "--port", f"udp:{port}", *serverArgs], {})
    if kind in ("asyncio", "uvloop"):
        extra = ["--uvloop"] if kind == "uvloop" else []
        return [sys.executable, "-m", "echoplug.lab.asyncioecho", "--udp", *extra, str(port)], {}
    if kind == "c-epoll":
        from echoplug.lab import cbuild

        try:
            return [str(cbuild.build("cudpecho")), str(port)], {}
        except cbuild.BuildError as e:
            raise ServerError(str(e)) from None
    raise ServerError(f"{kind} has no UDP echo")


def spawn(kind: str, reactor: str, logDir: Path, serverArgs: Sequence[str] = (),
          transport: str = "tcp") -> Server:
    """Start a server; do not wait for it (see L{waitReady})."""
    port = procs.freePort(socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
    argv, extra = command(kind, reactor, port, list(serverArgs), transport)
    notify = None
    if kind == "echoplug" and workerCount(serverArgs) > 1:
        # The lab plays the service manager: a NOTIFY_SOCKET of its own.
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"echoplug-lab-{os.getpid()}-{port}"
        notify.bind("\0" + name)
        extra["NOTIFY_SOCKET"] = "@" + name
    logDir.mkdir(parents=True, exist_ok=True)
    log = logDir / f"{kind}-{reactor}-{port}.log"
    calls = counted(extra, (logDir / f"{kind}-{reactor}-{port}.calls").resolve())
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=logDir, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=procs.childEnv(extra),
                                start_new_session=True)
    return Server(kind, reactor, port, proc, log, argv, notify=notify, transport=transport,
                  calls=calls)


def counted(env: dict[str, str], path: Path) -> Path | None:
    """
    Count the server's poller calls in C{path}: add C{pollcount.c}'s shared
    object to C{LD_PRELOAD} in C{env}. Without a C compiler, count nothing
    (return None); the wake-ups are then blank, the rest of the figures are not.
    """
    import os

    from echoplug.lab import cbuild

    try:
        shim = cbuild.build("pollcount")
    except cbuild.BuildError:
        return None
    path.unlink(missing_ok=True)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), os.environ.get("LD_PRELOAD")]))
    env["ECHOPLUG_LAB_CALLS"] = str(path)
    return path


def waitReady(server: Server, timeout: float = 30.0) -> None:
    """
    Wait until C{server} accepts a connection.

    @raise ServerError: if it exits first or does not answer in time.
    """
    wait = procs.waitForUDPEcho if server.transport == "udp" else procs.waitForPort
    try:
        listening = wait(server.port, timeout, server.alive)
    except TimeoutError:
        raise ServerError(f"{server.name} did not listen within {timeout:g}s") from None
    if listening and server.notify is not None:
        listening = waitNotified(server, timeout)
    if not listening:
        raise ServerError(f"{server.name} exited with status {server.proc.wait()}: "
                          f"{server.lastWords() or 'no output'}")


def waitNotified(server: Server, timeout: float) -> bool:
    """Wait for C{READY=1} on the server's notify socket; C{False} if it exits."""
    assert server.notify is not None
    deadline = time.monotonic() + timeout
    while server.alive():
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerError(f"{server.name}: not every worker listened within {timeout:g}s")
        server.notify.settimeout(min(left, 0.2))
        try:
            if "READY=1" in server.notify.recv(4096).decode().splitlines():
                return True
        except TimeoutError:
            continue
    return False


def workerCount(serverArgs: Sequence[str]) -> int:
    """The C{--workers N} among echoplug's arguments (the last one wins), else 1."""
    count = 1
    for i, arg in enumerate(serverArgs):
        value = None
        if arg == "--workers" and i + 1 < len(serverArgs):
            value = serverArgs[i + 1]
        elif arg.startswith("--workers="):
            value = arg.split("=", 1)[1]
        if value == "auto":
            count = len(os.sched_getaffinity(0))
        elif value is not None:
            # A bad value is the server's to refuse, in its own words.
            count = int(value) if value.isdigit() else 1
    return count


def start(kind: str, reactor: str, logDir: Path, serverArgs: Sequence[str] = (),
          timeout: float = 30.0, tries: int = 3, transport: str = "tcp") -> Server:
    """Start a server and wait until it listens, retrying a port taken meanwhile."""
    for attempt in range(tries):
        server = spawn(kind, reactor, logDir, serverArgs, transport)
        try:
            waitReady(server, timeout)
            return server
        except ServerError:
            server.stop()
            if "in use" not in server.lastWords() or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")
