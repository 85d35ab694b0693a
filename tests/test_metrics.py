"""
Tests of L{echoplug.metrics} and C{--metrics}: a real C{twistd echoplug}
scraped over loopback, the byte counters checked against what was echoed,
the lazy import of prometheus_client, and the metrics port against hostile
clients (pipelining without reading, bodies, slow requests, many idle
connections) and against many open connections (a scrape's cost).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import pytest_twisted
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.task import deferLater

from echoplug._twisted import unsentBytes
from echoplug.factory import EchoFactory
from echoplug.lab import procs
from echoplug.metrics import MetricsSite, ProcessStats, makeRegistry
from tests.support import REACTORS, connect, recvAll, served, testEnv, twistd

METRICS_LINE = r"serving metrics on 127\.0\.0\.1:(?P<port>\d+) at /metrics"


def scrape(port: int) -> dict[str, float]:
    """GET /metrics and return every sample, by name (labels dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = sample.value
    return samples


def scrapeInfo(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "echoplug_info":
                return dict(sample.labels)
    raise AssertionError(f"no echoplug_info in:\n{text}")


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after[name] - before[name]


@pytest.mark.slow
@pytest.mark.parametrize("reactor", REACTORS)
def test_counters_rise_by_what_was_echoed(tmp_path, reactor: str) -> None:
    size = 3 * 1024 * 1024 + 17
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    with twistd(reactor, "--metrics", "tcp:0:interface=127.0.0.1", cwd=tmp_path) as server:
        mport = int(server.waitFor(METRICS_LINE)["port"])
        before = scrape(mport)
        assert before["echoplug_connections_open"] == 0
        with connect(server.port) as s:
            echoed = bytearray()

            def read() -> None:
                while len(echoed) < size:
                    echoed.extend(s.recv(1 << 16) or b"!")  # "!" on EOF: a mismatch

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            s.sendall(payload)
            reader.join(30)
            assert bytes(echoed) == payload
            during = scrape(mport)
            # Open connection: its bytes are counted when it closes, so that
            # a scrape costs the same however many connections are open.
            assert delta(during, before, "echoplug_received_bytes_total") == 0
            assert during["echoplug_connections_open"] == 1
            s.shutdown(socket.SHUT_WR)
            assert recvAll(s) == b""
        server.waitFor(rf"close .* {size} bytes received, {size} bytes sent")
        after = scrape(mport)
    # Closed connection: counted at close.
    assert delta(after, before, "echoplug_received_bytes_total") == size
    assert delta(after, before, "echoplug_sent_bytes_total") == size
    assert delta(after, before, "echoplug_connections_accepted_total") == 1
    assert after["echoplug_connections_open"] == 0
    assert after["echoplug_connections_refused_total"] == 0
    assert after.get("process_resident_memory_bytes", 0) > 0


@pytest.mark.slow
def test_reactor_info_and_only_metrics_is_served(tmp_path) -> None:
    with twistd("poll", "--metrics", "tcp:0:interface=127.0.0.1", cwd=tmp_path) as server:
        mport = int(server.waitFor(METRICS_LINE)["port"])
        info = scrapeInfo(mport)
        get = exchange(mport, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head = exchange(mport, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        others = {path: exchange(mport, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                  for path in (b"/", b"/metrics/", b"/metrics/x", b"/x")}
        methods = {m: exchange(mport, b"%s /metrics HTTP/1.1\r\nHost: x\r\n\r\n" % m)
                   for m in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"BREW")}
    assert info["reactor"] == "poll"
    assert info["reactor_class"] == "PollReactor"
    assert get.startswith(b"HTTP/1.1 200 ")
    getHead = get.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nconnection: close\r\n" in getHead.lower()
    # HEAD: the GET's headers, with its length, and no body.
    headHead, headBody = head.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and headBody == b""
    assert re.search(rb"(?i)content-length: \d+", headHead)
    for path, answer in others.items():
        assert answer.startswith(b"HTTP/1.1 404 "), path
    for method, answer in methods.items():
        assert answer.startswith(b"HTTP/1.1 405 "), method
        assert b"\r\nallow: get, head\r\n" in answer.lower()
    out = server.output()
    assert "GET /metrics" not in out  # no access line per scrape
    assert "eat it" not in out  # twisted.web's line for a HEAD that returned a body
    assert "Traceback" not in out


def exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send C{request} on a new connection, then read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return recvAll(s)


def pushUnread(sock: socket.socket, data: bytes, seconds: float, limit: int) -> int:
    """
    Send C{data} again and again for C{seconds} (at most C{limit} bytes),
    never reading; return how many bytes the server's side took before it
    stopped taking them or closed.
    """
    sock.setblocking(False)
    pushed = 0
    end = time.monotonic() + seconds
    while pushed < limit and time.monotonic() < end:
        try:
            pushed += sock.send(data)
        except BlockingIOError:
            time.sleep(0.005)
        except OSError:  # EPIPE or ECONNRESET: the server closed
            break
    sock.setblocking(True)
    return pushed


def readUntilClosed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server sent, up to its EOF or reset (a reset is also an end)."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while data := sock.recv(1 << 16):
            got += data
    except (ConnectionResetError, TimeoutError):
        pass
    return bytes(got)


@pytest.mark.slow
def test_pipelining_without_reading_gets_one_answer(tmp_path) -> None:
    """
    A client that pipelines GETs and never reads gets one answer and a
    close; the server neither renders the rest nor buffers their answers.
    """
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    with twistd(None, "--metrics", "tcp:0:interface=127.0.0.1", cwd=tmp_path) as server:
        mport = int(server.waitFor(METRICS_LINE)["port"])
        scrape(mport)  # warm up: imports and first render are not the flood's
        rss, cpu = procs.rssBytes(server.pid), procs.cpuSeconds(server.pid)
        with socket.create_connection(("127.0.0.1", mport)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # read nothing, hold little
            pushUnread(s, request * 400, seconds=3.0, limit=64 << 20)
            # The echo port is not held up meanwhile.
            with connect(server.port) as e:
                start = time.monotonic()
                assert served(e)
                assert time.monotonic() - start < 1.0
            answers = readUntilClosed(s).count(b"HTTP/1.1 200 ")
        grewBy = procs.rssBytes(server.pid) - rss
        spent = procs.cpuSeconds(server.pid) - cpu
        assert scrape(mport)["echoplug_metrics_connections_open"] == 1  # this scrape
    assert answers <= 1
    assert grewBy < 16 << 20, grewBy
    assert spent < 1.0, spent


@pytest.mark.slow
@pytest.mark.parametrize("header", [b"Content-Length: 10000000000",
                                    b"Transfer-Encoding: chunked"])
def test_a_body_is_refused_before_it_is_read(tmp_path, header: bytes) -> None:
    with twistd(None, "--metrics", "tcp:0:interface=127.0.0.1", cwd=tmp_path) as server:
        mport = int(server.waitFor(METRICS_LINE)["port"])
        rss = procs.rssBytes(server.pid)
        with socket.create_connection(("127.0.0.1", mport)) as s:
            s.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
            answer = s.recv(4096)
            pushed = pushUnread(s, b"1000\r\n" + b"x" * 4096 + b"\r\n", seconds=3.0,
                                limit=64 << 20)
        grewBy = procs.rssBytes(server.pid) - rss
        after = scrape(mport)
        server.waitFor(r"metrics: refused a request with a body from 127\.0\.0\.1:\d+")
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    # Only what the kernels' buffers held: twisted.web would have taken it all.
    assert pushed < 16 << 20, pushed
    assert grewBy < 8 << 20, grewBy
    assert after["echoplug_metrics_bodies_refused_total"] == 1


@pytest.mark.slow
def test_a_slow_request_is_cut_at_the_deadline(tmp_path) -> None:
    """A client trickling its headers a byte at a time is closed at the deadline."""
    with twistd(None, "--metrics", "tcp:0:interface=127.0.0.1", cwd=tmp_path) as server:
        mport = int(server.waitFor(METRICS_LINE)["port"])
        with socket.create_connection(("127.0.0.1", mport)) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            start = time.monotonic()
            closed = False
            while not closed and time.monotonic() - start < MetricsSite.deadline + 3:
                try:
                    s.sendall(b"X")
                    time.sleep(0.25)
                except OSError:
                    closed = True
            took = time.monotonic() - start
        samples = scrape(mport)
        server.waitFor(r"metrics: closed 127\.0\.0\.1:\d+ at the 5s deadline")
    assert closed
    assert MetricsSite.deadline - 0.5 < took < MetricsSite.deadline + 2
    assert samples["echoplug_metrics_timeouts_total"] == 1


@pytest.mark.slow
def test_metrics_connections_are_capped(tmp_path) -> None:
    """Idle metrics clients take at most 16 descriptors; echo is untouched."""
    cap = MetricsSite.maxConnections
    with twistd(None, "--metrics", "tcp:0:interface=127.0.0.1", cwd=tmp_path) as server:
        mport = int(server.waitFor(METRICS_LINE)["port"])
        held = [socket.create_connection(("127.0.0.1", mport)) for _ in range(cap)]
        extra = [socket.create_connection(("127.0.0.1", mport)) for _ in range(20)]
        try:
            for s in extra:  # closed at accept, without an answer
                assert readUntilClosed(s, timeout=5) == b""
            with connect(server.port) as e:
                assert served(e)
        finally:
            for s in held + extra:
                s.close()
        deadline = time.monotonic() + 5
        while True:  # until the server has seen the held ones go
            try:
                samples = scrape(mport)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    assert samples["echoplug_metrics_connections_refused_total"] >= 20
    lines = [line for line in server.lines if "metrics: refused" in line]
    assert 1 <= len(lines) <= 3  # at most one a second


class Exploding(set):  # type: ignore[type-arg]
    """A set of connections that a scrape must not walk."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("a scrape walked the open connections")


def test_a_scrape_walks_no_connection_and_lists_no_descriptor(monkeypatch) -> None:
    """
    A scrape's cost does not grow with the connections or the descriptors:
    it neither iterates the open connections nor lists /proc/self/fd.
    """
    factory = EchoFactory()
    factory.connections = Exploding({object() for _ in range(3)})

    def listdir(path):  # type: ignore[no-untyped-def]
        raise AssertionError(f"a scrape listed {path}")

    monkeypatch.setattr(os, "listdir", listdir)
    text = generate_latest(makeRegistry(factory, reactor)).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["echoplug_connections_open"] == 3
    assert samples["process_resident_memory_bytes"] > 0
    if os.stat("/proc/self/fd").st_size:  # Linux 6.2 and later count them there
        assert samples["process_open_fds"] >= 3


def test_process_stats_are_named_as_prometheus_client_names_them() -> None:
    ours = {f.name for f in ProcessStats().collect()}
    theirs = {f.name for f in ProcessCollector(registry=None).collect()}
    if not os.stat("/proc/self/fd").st_size:
        theirs.discard("process_open_fds")
    assert ours == theirs


class Push(protocol.Protocol):
    """Write without ever reading, so the server's send buffer fills."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # read nothing
        self.transport.write(b"y" * (8 * 1024 * 1024))


@pytest_twisted.inlineCallbacks
def test_sent_excludes_what_an_abort_dropped():
    """
    A connection cut mid-stream has sent less than it received: the send
    buffer it dropped is not counted as sent (in the counters and in the
    access line).
    """
    factory = EchoFactory()
    port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    client = None
    try:
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            protocol.Factory.forProtocol(Push))
        for _ in range(200):  # until the server has echoed into a full buffer
            yield deferLater(reactor, 0.02, lambda: None)
            if factory.connections and unsentBytes(next(iter(factory.connections)).transport):
                break
        (proto,) = factory.connections
        received = proto.bytesIn
        unsent = unsentBytes(proto.transport)
        assert 0 < unsent <= received
        proto.close("test")
        yield deferLater(reactor, 0.05, lambda: None)
        assert not factory.connections
        assert factory.bytesReceived == received
        assert factory.bytesSent == received - unsent
    finally:
        if client is not None:
            client.transport.abortConnection()
        yield port.stopListening()


@pytest.mark.slow
def test_missing_prometheus_client_is_one_line(tmp_path) -> None:
    # sitecustomize runs first in the child: it makes prometheus_client
    # unimportable, as if the metrics extra were not installed.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['prometheus_client'] = None\n")
    env = testEnv()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    with twistd(None, "--metrics", "9100", cwd=tmp_path, env=env, wait=False) as server:
        assert server.proc.wait(30) != 0
    out = server.output()
    assert "Traceback" not in out
    assert ("twistd echoplug: --metrics needs prometheus_client: "
            "pip install 'echoplug[metrics]'") in out


@pytest.mark.slow
@pytest.mark.parametrize("value, message", [
    ("nope", "--metrics 'nope': not a port number or an endpoint"),
    ("70000", "--metrics 70000: a port number is 0 to 65535"),
])
def test_bad_metrics_endpoint_is_one_line(tmp_path, value: str, message: str) -> None:
    with twistd(None, "--metrics", value, cwd=tmp_path, wait=False) as server:
        assert server.proc.wait(30) != 0
    assert "Traceback" not in server.output()
    assert message in server.output()


@pytest.mark.slow
def test_metrics_port_in_use_is_one_line(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with twistd(None, "--metrics", str(port), cwd=tmp_path, wait=False) as server:
            assert server.proc.wait(30) != 0
    out = server.output()
    assert "Traceback" not in out
    assert f"echoplug: cannot listen on --metrics tcp:{port}:interface=127.0.0.1" in out


def test_prometheus_client_is_imported_only_for_metrics() -> None:
    code = (
        "import sys\n"
        "import echoplug, echoplug.tap\n"
        "from twisted.plugins import echoplug_plugin\n"
        "o = echoplug.tap.Options(); o.parseOptions(['--port', '0'])\n"
        "echoplug.tap.makeService(o)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "o = echoplug.tap.Options(); o.parseOptions(['--port', '0', '--metrics', '0'])\n"
        "assert 'prometheus_client' in sys.modules\n"
    )
    env = testEnv()
    env.pop("NOTIFY_SOCKET", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_refused_connections_are_counted(tmp_path) -> None:
    with twistd(None, "--max-connections", "1", "--metrics", "tcp:0:interface=127.0.0.1",
                cwd=tmp_path) as server:
        mport = int(server.waitFor(METRICS_LINE)["port"])
        with connect(server.port) as held:
            held.sendall(b"a")
            assert held.recv(1) == b"a"
            with connect(server.port) as extra:
                try:
                    assert recvAll(extra) == b""  # closed at once, unserved
                except ConnectionResetError:
                    pass
            server.waitFor(r"refused 127\.0\.0\.1:\d+")
            samples = scrape(mport)
    assert samples["echoplug_connections_refused_total"] == 1
    assert samples["echoplug_connections_accepted_total"] == 1
    assert samples["echoplug_connections_open"] == 1
    assert samples["echoplug_buffered_bytes"] == 0  # an echo that keeps up holds nothing
    assert samples["echoplug_buffer_stalls_total"] == 0
