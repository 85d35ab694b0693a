"""
echoplug behind real load balancers. HAProxy (docs/deploy/haproxy.cfg, on other ports):
the access log names each client's own address and port, and a rolling
restart of both instances under steady load loses no connection and no byte.

HAProxy runs as a plain foreground process (C{haproxy -f CFG -db}), never as
a service; Debian's package C{haproxy} provides it (C{.ci/run} installs it).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Server, freePort, startProcess, twistd

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy")
                                      else None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed "
                       "(Debian package haproxy; .ci/run installs it)"),
]
SHIPPED = ROOT / "docs" / "deploy" / "haproxy.cfg"
#: The client's own loopback address, so that the log shows it and not HAProxy's.
CLIENT = "127.0.0.2"


def render(front: int, a: int, b: int, sock: Path) -> str:
    """The shipped configuration with test ports and a stats socket of the test's own."""
    text = SHIPPED.read_text()
    for old, new in (("127.0.0.1:7000", f"127.0.0.1:{front}"),
                     ("127.0.0.1:10001", f"127.0.0.1:{a}"),
                     ("127.0.0.1:10002", f"127.0.0.1:{b}"),
                     ("/run/haproxy/echoplug.sock", str(sock))):
        assert old in text, old
        text = text.replace(old, new)
    return text


def states(sock: Path) -> dict[str, str]:
    """Each echoplug server's status as HAProxy sees it (UP, DOWN, ...)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {r["svname"]: r["status"] for r in rows if r["pxname"] == "echoplug"
            and r["svname"] in ("a", "b")}


def waitState(sock: Path, name: str, want: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if states(sock).get(name, "").startswith(want):
                return
        time.sleep(0.05)
    raise AssertionError(f"HAProxy never saw {name} {want}: {states(sock)}")


class Load:
    """
    Clients that keep opening connections through HAProxy, each sending a
    random payload, half-closing and reading the echo to EOF. Bounded in
    count and time.
    """

    def __init__(self, port: int, threads: int = 3, limit: int = 20000) -> None:
        self.port = port
        self.limit = limit
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.mismatches = 0
        self.ports: set[int] = set()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(threads)]

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set() and self.ok + len(self.failures) < self.limit:
            payload = rng.randbytes(rng.randint(1, 32 << 10))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                              source_address=(CLIENT, 0)) as s:
                    local = s.getsockname()[1]
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    echoed = bytearray()
                    while chunk := s.recv(65536):
                        echoed += chunk
            except OSError as e:
                with self.lock:
                    self.failures.append(repr(e))
                continue
            with self.lock:
                self.ports.add(local)
                if echoed == payload:
                    self.ok += 1
                else:
                    self.mismatches += 1
            time.sleep(0.005)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def served(self) -> int:
        with self.lock:
            return self.ok


def waitServed(load: Load, more: int, timeout: float = 10.0) -> None:
    """Wait until the load has completed C{more} connections more."""
    target = load.served() + more
    deadline = time.monotonic() + timeout
    while load.served() < target and time.monotonic() < deadline:
        time.sleep(0.02)
    assert load.served() >= target, f"the load stalled: {load.failures[:3]}"


ACCESS = re.compile(r"close (?P<host>[\d.]+):(?P<port>\d+) via 127\.0\.0\.1:\d+ after")


def test_rolling_restart_behind_haproxy_loses_nothing(tmp_path: Path) -> None:
    front, ports = freePort(), {"a": freePort(), "b": freePort()}
    sock = tmp_path / "haproxy.sock"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render(front, ports["a"], ports["b"], sock))
    logs: list[Server] = []

    @contextlib.contextmanager
    def instance(name: str) -> Iterator[Server]:
        with twistd(None, "--port", f"tcp:{ports[name]}:interface=127.0.0.1",
                    "--proxy-protocol", "required", "--drain-timeout", "5",
                    cwd=tmp_path) as server:
            logs.append(server)
            yield server

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        running = {name: stack.enter_context(instance(name)) for name in ("a", "b")}
        haproxy = startProcess([HAPROXY, "-f", str(cfg), "-db"], tmp_path)
        stack.callback(haproxy.stop)
        for name in ("a", "b"):
            waitState(sock, name, "UP")
        with Load(front) as load:
            waitServed(load, 20)
            for name in ("a", "b"):
                # SIGTERM: the instance stops listening and drains; HAProxy
                # retries refused connections on the other one.
                server = running[name]
                server.proc.send_signal(signal.SIGTERM)
                assert server.proc.wait(15) == -signal.SIGTERM, server.output()
                waitState(sock, name, "DOWN")
                waitServed(load, 20)  # served by the other alone
                running[name] = stack.enter_context(instance(name))
                waitState(sock, name, "UP")
                waitServed(load, 20)
        assert haproxy.proc.poll() is None, haproxy.output()
    elapsed = time.monotonic() - started

    summary = (f"{load.ok} ok, {len(load.failures)} failed {load.failures[:3]}, "
               f"{load.mismatches} mismatched, in {elapsed:.1f}s")
    print(summary)
    assert (len(load.failures), load.mismatches) == (0, 0), summary
    assert load.ok >= 100, summary
    # Every instance's access log names the clients themselves: their own
    # address and port, as the client saw them, with HAProxy's as "via".
    for server in logs:
        seen = [m for line in server.lines if (m := ACCESS.search(line))]
        assert seen, server.output()
        assert {m["host"] for m in seen} == {CLIENT}
        assert {int(m["port"]) for m in seen} <= load.ports


def nginxStreamModule() -> str | None:
    """
    The C{load_module} line nginx needs for C{stream}, C{""} if it is built
    in, C{None} if this nginx has no stream module at all.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    if "--with-stream=dynamic" not in built:
        return "" if "--with-stream" in built else None
    for path in (os.environ.get("ECHOPLUG_NGINX_STREAM_MODULE", ""),
                 "/usr/lib/nginx/modules/ngx_stream_module.so"):
        if path and os.path.exists(path):
            return f"load_module {path};"
    return None


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                  else None)


@pytest.mark.skipif(NGINX is None or nginxStreamModule() is None,
                    reason="nginx with the stream module is not installed "
                    "(Debian: nginx and libnginx-mod-stream; .ci/run installs them)")
def test_nginx_stream_config_parses(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"{nginxStreamModule()}\npid {tmp_path}/nginx.pid;\n"
                    f"error_log {tmp_path}/error.log;\nevents {{}}\n"
                    f"include {ROOT / 'docs' / 'deploy' / 'nginx-stream.conf'};\n")
    assert NGINX is not None
    result = subprocess.run([NGINX, "-t", "-q", "-c", str(conf), "-p", str(tmp_path),
                             "-e", str(tmp_path / "error.log")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
