"""
Tests of L{echoplug.metrics} and C{--metrics}: a real C{twistd echoplug}
scraped over loopback, the byte counters checked against what was echoed,
and the lazy import of prometheus_client.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.task import deferLater

from echoplug._twisted import unsentBytes
from echoplug.factory import EchoFactory
from tests.support import REACTORS, connect, recvAll, testEnv, twistd

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
            # Open connection: counted from its live state.
            assert delta(during, before, "echoplug_received_bytes_total") == size
            assert delta(during, before, "echoplug_sent_bytes_total") == size
            assert during["echoplug_connections_open"] == 1
            s.shutdown(socket.SHUT_WR)
            assert recvAll(s) == b""
        server.waitFor(rf"close .* {size} bytes echoed")
        after = scrape(mport)
    # Closed connection: counted at close.
    assert delta(after, before, "echoplug_received_bytes_total") == size
    assert delta(after, before, "echoplug_sent_bytes_total") == size
    assert delta(after, before, "echoplug_connections_accepted_total") == 1
    assert after["echoplug_connections_open"] == 0
    assert after["echoplug_connections_refused_total"] == 0
    assert after.get("process_resident_memory_bytes", 0) > 0


@pytest.mark.slow
def test_reactor_info_and_root_page(tmp_path) -> None:
    with twistd("poll", "--metrics", "tcp:0:interface=127.0.0.1", cwd=tmp_path) as server:
        mport = int(server.waitFor(METRICS_LINE)["port"])
        info = scrapeInfo(mport)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/", timeout=10) as response:
            assert b"/metrics" in response.read()
    assert info["reactor"] == "poll"
    assert info["reactor_class"] == "PollReactor"
    assert "GET /metrics" not in server.output()  # no access line per scrape


class Push(protocol.Protocol):
    """Write without ever reading, so the server's send buffer fills."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # read nothing
        self.transport.write(b"y" * (8 * 1024 * 1024))


@pytest_twisted.inlineCallbacks
def test_sent_excludes_what_an_abort_dropped():
    """
    A connection cut mid-stream has sent less than it received: the send
    buffer it dropped is not counted as sent.
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
        assert factory.openSentBytes() == received - unsent
        proto.close("test")
        yield deferLater(reactor, 0.05, lambda: None)
        assert not factory.connections
        assert factory.bytesEchoed == received
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
