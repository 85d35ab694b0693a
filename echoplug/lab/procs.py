# -*- test-case-name: tests.test_servers -*-
"""
The process helpers of the lab and the tests, in one copy: a free port, the
C{twistd} command line and a child's environment, waiting until a port
listens or a log line appears, and a process's CPU time and RSS from
C{/proc}.

The lab (L{echoplug.lab.servers}, L{echoplug.lab.runner},
L{echoplug.lab.soak}) and the tests (tests/support.py) start their children
through these, so a child always runs the echoplug this one runs from.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import echoplug

#: The checkout (or site-packages) this echoplug was imported from.
ROOT = Path(echoplug.__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# twistd from this interpreter, when its console script is not beside it.
LAUNCHER = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def freePort(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """
    A TCP port (or with C{kind=SOCK_DGRAM}, a UDP port) free on 127.0.0.1
    now (the caller retries the rare race).
    """
    with socket.socket(type=kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistdArgv() -> list[str]:
    """
    How to run C{twistd} of this interpreter: its console script, or the
    same through C{python -c}. Either way the child's pid is twistd's own
    (no wrapper process).
    """
    beside = Path(sys.executable).with_name("twistd")
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-c", LAUNCHER]


def childEnv(extra: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment of a child: this echoplug's root comes first on
    C{PYTHONPATH}, so twistd finds the same echoplug (and its dropin) even
    beside another installed copy, and a Python child runs the same code.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def waitForPort(port: int, timeout: float = 10.0,
                alive: Callable[[], bool] = lambda: True, host: str = "127.0.0.1") -> bool:
    """
    Wait until something accepts a connection on C{host:port}. Return
    C{True} once it does, C{False} as soon as C{alive()} is false (the
    server exited).

    @raise TimeoutError: if nothing listens within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s")


def waitForUDPEcho(port: int, timeout: float = 10.0,
                   alive: Callable[[], bool] = lambda: True, host: str = "127.0.0.1") -> bool:
    """
    L{waitForPort} for a UDP echo server: wait until a probe datagram sent
    to C{host:port} comes back. A UDP port cannot be connected to; an echo
    is the only sign that a server reads it.

    @raise TimeoutError: if nothing answers within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            if not alive():
                return False
            try:
                s.sendto(b"ready?", (host, port))
                if s.recv(64) == b"ready?":
                    return True
            except OSError:  # nothing there yet (ICMP unreachable), or a lost probe
                time.sleep(0.05)
    raise TimeoutError(f"no UDP echo from {host}:{port} after {timeout:g}s")


def waitForLine(lines: Sequence[str], pattern: str, timeout: float = 10.0,
                alive: Callable[[], bool] = lambda: True) -> re.Match[str] | None:
    """
    Wait until one of C{lines} (a list another thread appends to) matches
    C{pattern}; return the match, or C{None} after C{timeout} or once
    C{alive()} is false and no new line matched.
    """
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    seen = 0
    while time.monotonic() < deadline:
        running = alive()
        for line in lines[seen:]:
            m = rx.search(line)
            if m:
                return m
        seen = len(lines)
        if not running:
            break
        time.sleep(0.02)
    return None


def cpuSeconds(pid: int) -> float:
    """
    utime + stime of process C{pid}, in seconds, from C{/proc/PID/stat}: all
    the time the kernel billed to it, in user space and in system calls.

    @raise OSError: if the process is gone.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces: split after its ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def treeStats(pid: int) -> list[list[str]]:
    """
    The C{/proc/PID/stat} fields after the command name (the state first)
    of process C{pid} and of every process under it, from one pass over
    C{/proc}.

    @raise OSError: if C{pid} itself is gone.
    """
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        fields = stat[stat.rindex(")") + 2:].split()
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        stats[child] = fields
    if pid not in stats:
        cpuSeconds(pid)  # raises OSError for a missing process
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        if p in stats:
            found.append(stats[p])
        stack.extend(children.get(p, []))
    return found


def treeCpuSeconds(pid: int) -> float:
    """
    The CPU time of process C{pid} and every process under it (a --workers
    parent and its workers): for each, utime + stime and the times of its
    children already reaped (cutime + cstime), which is where a worker's
    time goes when it dies. The sum only moves from one process to another
    when a process exits, so a difference of two readings is the tree's
    CPU time in between.

    @raise OSError: if C{pid} itself is gone.
    """
    return sum(sum(int(f) for f in fields[11:15]) for fields in treeStats(pid)) / TICKS


def treeRssBytes(pid: int) -> int:
    """
    The resident set size of process C{pid} and every process under it (a
    --workers parent and its workers), summed: field C{rss} of
    C{/proc/PID/stat}, the same count as C{VmRSS}. Pages two of them share
    (a forked worker's copy-on-write pages) count in each.

    @raise OSError: if C{pid} itself is gone.
    """
    return sum(int(fields[21]) for fields in treeStats(pid)) * PAGE


def rssBytes(pid: int) -> int:
    """
    Resident set size of process C{pid}, from C{/proc/PID/status}.

    @raise OSError: if the process is gone.
    @raise ValueError: if it has no VmRSS (a zombie).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"process {pid} has no VmRSS")
