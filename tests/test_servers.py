"""
The lab's servers: each kind starts as its own process under the reactor
asked for, echoes, shows its CPU time, and a server that cannot start is
one line.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest

from echoplug.lab import cbuild, procs, servers
from echoplug.lab.servers import ServerError
from tests.support import echoHalfClose, pushWithoutReading, rssBytes

HAVE_CC = cbuild.compiler() is not None
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def echoOnce(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = bytearray()
        while len(got) < len(data) and (chunk := s.recv(65536)):
            got += chunk
    return bytes(got)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "reactor"), [
    ("echoplug", "poll"),
    ("wire-echo", "select"),
    ("asyncio", "stdlib"),
    pytest.param("c-epoll", "C", marks=pytest.mark.skipif(not HAVE_CC, reason="no cc")),
    pytest.param("uvloop", "uvloop",
                 marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")),
])
def test_each_kind_starts_echoes_and_bills_cpu(kind, reactor, tmp_path) -> None:
    server = servers.start(kind, reactor, tmp_path)
    try:
        before = server.cpuSeconds()
        payload = bytes(range(256)) * 40
        assert echoOnce(server.port, payload) == payload
        assert server.cpuSeconds() >= before >= 0
        if kind != "c-epoll":  # a C server may not have used a tick yet
            assert before > 0
        assert server.alive()
    finally:
        server.stop()
    assert not server.alive()


@pytest.mark.slow
def test_the_reactor_is_passed_to_twistd(tmp_path) -> None:
    server = servers.start("echoplug", "select", tmp_path, ["--log-level", "info"])
    try:
        echoOnce(server.port, b"x")
    finally:
        server.stop()
    assert "reactor=select (SelectReactor)" in server.log.read_text()


def test_wire_echo_is_the_stock_protocol(monkeypatch) -> None:
    """The peer is twisted.protocols.wire.Echo itself, not a copy."""
    import runpy

    from twisted.protocols.wire import Echo

    monkeypatch.setenv("ECHOPLUG_LAB_PORT", "0")
    tac = runpy.run_path(str(servers.Path(servers.__file__).with_name("wireecho.py")))
    assert tac["factory"].protocol is Echo


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "reactor", "args", "why"), [
    ("echoplug", "kqueue", [], "reactor cannot be used"),
    ("wire-echo", "nosuch", [], "reactor"),
    ("echoplug", "epoll", ["--log-level", "nope"], "--log-level 'nope'"),
])
def test_a_server_that_cannot_start_is_one_line(kind, reactor, args, why, tmp_path) -> None:
    with pytest.raises(ServerError) as e:
        servers.start(kind, reactor, tmp_path, args)
    assert why in str(e.value)
    assert "\n" not in str(e.value)


def test_cpu_of_a_missing_process() -> None:
    with pytest.raises(ServerError, match="cannot read the CPU time"):
        servers.cpuSeconds(2**22 + 1)


def test_rss_of_a_missing_process() -> None:
    with pytest.raises(ServerError, match="cannot read the RSS"):
        servers.rssBytes(2**22 + 1)


def test_labels() -> None:
    assert servers.label("echoplug", "epoll") == "echoplug/epoll"
    assert servers.label("asyncio", "stdlib") == "asyncio (stdlib)"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CC, reason="no cc")
def test_c_epoll_peer_is_a_correct_echo(tmp_path) -> None:
    """
    The floor is a fair one: it echoes every byte through a half-close, and
    a client that never reads does not grow it.
    """
    server = servers.start("c-epoll", "C", tmp_path)
    try:
        chunks = [bytes([i]) * 65536 for i in range(64)]  # 4 MiB
        assert echoHalfClose(server.port, chunks) == b"".join(chunks)
        before = rssBytes(server.pid)
        pushed, during = pushWithoutReading(server.port, 64 * 2**20,
                                            lambda: rssBytes(server.pid))
        assert pushed < 64 * 2**20  # it stalled: the server stopped reading
        assert during - before < 8 * 2**20
        assert "listening on 127.0.0.1" in server.log.read_text()
    finally:
        server.stop()


def test_uvloop_missing_is_one_line() -> None:
    """Without uvloop the peer says so in one line (uvloop made unimportable)."""
    code = ("import sys; sys.modules['uvloop'] = None; from echoplug.lab.asyncioecho "
            "import main; sys.exit(main(['--uvloop', '0']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=procs.childEnv(), timeout=60)
    assert done.returncode == 1
    assert done.stderr == "asyncio echo: uvloop is not installed (pip install uvloop)\n"


def test_tree_cpu_counts_children_alive_and_reaped() -> None:
    """A parent that burns nothing, with a child that burns 0.3 s of CPU and
    waits, then a second child reaped after it burns: the tree has both."""
    script = (
        "import os, sys, time\n"
        "def burn():\n"
        "    end = time.process_time() + 0.3\n"
        "    while time.process_time() < end: pass\n"
        "def child(wait):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        burn(); time.sleep(wait); os._exit(0)\n"
        "    return pid\n"
        "child(30)\n"
        "os.waitpid(child(0), 0)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert procs.cpuSeconds(proc.pid) < 0.2
        assert procs.treeCpuSeconds(proc.pid) >= 0.55
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(OSError):
        procs.treeCpuSeconds(proc.pid)


def test_tree_rss_counts_children() -> None:
    """This process's tree RSS is its own and its sleeping child's."""
    me = os.getpid()
    assert procs.treeRssBytes(me) > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        deadline = time.monotonic() + 4
        while procs.rssBytes(child.pid) < 4 << 20 and time.monotonic() < deadline:
            time.sleep(0.02)  # until the interpreter is in
        alone = procs.treeRssBytes(child.pid)
        assert alone >= 4 << 20
        own = procs.rssBytes(me)
        assert procs.treeRssBytes(me) - own >= 0.9 * alone
    finally:
        child.kill()
        child.wait()
    with pytest.raises(OSError):
        procs.treeRssBytes(child.pid)


# The udp workload's servers.


def datagramEcho(port: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(data, ("127.0.0.1", port))
        return s.recv(1 << 17)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "reactor"), [
    ("echoplug", "poll"),
    ("asyncio", "stdlib"),
    pytest.param("c-epoll", "C", marks=pytest.mark.skipif(not HAVE_CC, reason="no cc")),
    pytest.param("uvloop", "uvloop",
                 marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")),
])
def test_each_kind_serves_udp(kind, reactor, tmp_path) -> None:
    server = servers.start(kind, reactor, tmp_path, transport="udp")
    try:
        payload = bytes(range(256)) * 200  # over Twisted's default of 8192
        assert datagramEcho(server.port, payload) == payload
        assert server.alive()
        if kind != "c-epoll":
            assert server.cpuSeconds() > 0
        assert "UDP" in server.log.read_text()
    finally:
        server.stop()


def test_wire_echo_has_no_udp(tmp_path) -> None:
    with pytest.raises(ServerError, match="wire-echo has no UDP echo"):
        servers.spawn("wire-echo", "epoll", tmp_path, transport="udp")


def test_waiting_for_a_udp_echo_that_never_comes() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))  # bound, never answering
        with pytest.raises(TimeoutError, match="no UDP echo"):
            procs.waitForUDPEcho(s.getsockname()[1], timeout=0.5)
    assert procs.waitForUDPEcho(1, timeout=5, alive=lambda: False) is False


def peerParam(kind: str):
    why = servers.missing(kind)
    return pytest.param(kind, marks=pytest.mark.skipif(why is not None, reason=why or ""))


@pytest.mark.slow
@pytest.mark.parametrize("kind", [peerParam(k) for k in ("gevent", "tornado", "trio", "node")])
def test_optional_peer_is_byte_exact_under_the_load_client(kind, tmp_path) -> None:
    """Each optional peer echoes every byte the load client checks, and bills its CPU."""
    from echoplug.lab import runner

    server = servers.start(kind, servers.STANDALONE[kind], tmp_path)
    try:
        payload = bytes(range(256)) * 40
        assert echoOnce(server.port, payload) == payload
        settings = runner.Settings(duration=0.3, warmup=0.1, load="c" if HAVE_CC else "twisted",
                                   logDir=tmp_path)
        sample = runner.measure(server, runner.Point("load", 3, 0, 4096), settings)
        assert sample.messages > 0 and sample.cpuSeconds >= 0
        if HAVE_CC:
            assert sample.wakeups > 0  # its poller calls were counted
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CC, reason="no cc")
def test_poller_calls_are_counted(tmp_path) -> None:
    """One message, one blocking poll at least: the preloaded counter moves."""
    server = servers.start("echoplug", "poll", tmp_path)
    try:
        before = server.wakeups()
        for _ in range(5):
            assert echoOnce(server.port, b"x") == b"x"
        assert server.wakeups() >= before + 5
        assert server.calls is not None and server.calls.parent == tmp_path.resolve()
    finally:
        server.stop()
