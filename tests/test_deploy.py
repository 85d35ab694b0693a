"""
Tests of the deployment under systemd, without booting systemd: the unit
files in docs/deploy pass C{systemd-analyze verify}, and socket activation
works for real through C{systemd-socket-activate}, which binds the port and
execs twistd as systemd would, with LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES.
"""

from __future__ import annotations

import configparser
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from echoplug.tap import Options
from tests.support import (
    ROOT,
    NotifyReceiver,
    connect,
    echoHalfClose,
    freePort,
    recvAll,
    startProcess,
    testEnv,
    twistdCommand,
)

DEPLOY = ROOT / "docs" / "deploy"
UNITS = ["echoplug.socket", "echoplug.service", "echoplug-udp.socket"]
#: Drop-ins: systemd-analyze reads them beside the unit they extend.
DROPINS = ["echoplug.service.d/udp.conf"]
ACTIVATE = shutil.which("systemd-socket-activate")
ANALYZE = shutil.which("systemd-analyze")
needsActivate = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate missing "
                                   "(Debian package systemd; .ci/run installs it)")
needsAnalyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing "
                                  "(Debian package systemd; .ci/run installs it)")


def installUnits(target: Path) -> list[Path]:
    """
    Copy the units into C{target} with ExecStart's twistd replaced by the
    twistd of this interpreter: C{systemd-analyze verify} checks that the
    binary exists, and /opt/echoplug (the path the docs install to) does not
    exist on a test machine. Nothing else is changed.
    """
    copies = []
    for name in UNITS + DROPINS:
        text = (DEPLOY / name).read_text()
        text = text.replace("/opt/echoplug/bin/twistd", twistdCommand()[0])
        copy = target / name
        copy.parent.mkdir(exist_ok=True)
        copy.write_text(text)
        if name in UNITS:
            copies.append(copy)
    return copies


def unitSettings(name: str) -> dict[str, list[str]]:
    """Every key of a unit file and its values, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.slow
@needsAnalyze
def test_units_verify_without_warnings(tmp_path) -> None:
    copies = installUnits(tmp_path)
    result = subprocess.run([ANALYZE, "verify", "--man=no", *map(str, copies)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # Unknown keys and bad values only warn, with status 0: stderr must be empty.
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.slow
@needsAnalyze
def test_verify_catches_a_typo(tmp_path) -> None:
    """The check above can fail: a misspelt key is a warning on stderr."""
    copies = installUnits(tmp_path)
    service = copies[1]
    service.write_text(service.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = subprocess.run([ANALYZE, "verify", "--man=no", *map(str, copies)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "NoNewPrivilege" in result.stderr


@pytest.mark.slow
@needsAnalyze
def test_verify_reads_the_udp_dropin(tmp_path) -> None:
    """The drop-in is checked too: a misspelt key in it is a warning."""
    copies = installUnits(tmp_path)
    dropin = tmp_path / DROPINS[0]
    dropin.write_text(dropin.read_text().replace("Sockets=", "Socketz="))
    result = subprocess.run([ANALYZE, "verify", "--man=no", *map(str, copies)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "Socketz" in result.stderr


@pytest.mark.slow
@needsAnalyze
def test_security_exposure_is_low(tmp_path) -> None:
    service = installUnits(tmp_path)[1]
    result = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(service)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    m = re.search(r"Overall exposure level for echoplug\.service: ([\d.]+)", result.stdout)
    assert m, result.stdout + result.stderr
    # docs/deploying.md reports the score; anything above 2 means a setting was lost.
    assert float(m[1]) <= 2.0, result.stdout


def test_units_say_what_the_issue_asks() -> None:
    service = unitSettings("echoplug.service")
    socket_ = unitSettings("echoplug.socket")
    assert service["Type"] == ["notify"]
    assert socket_["FileDescriptorName"] == ["echoplug"]
    (execStart,) = service["ExecStart"]
    argv = execStart.split()
    assert argv[1:6] == [
        "--nodaemon", "--pidfile=", "echoplug", "--port", "systemd:domain=INET:name=echoplug",
    ]
    options = Options()
    options.parseOptions([*argv[6:], "--port", "0"])  # the options after the port
    for key in ("DynamicUser", "NoNewPrivileges", "ProtectHome", "PrivateDevices",
                "RestrictNamespaces", "LockPersonality", "RestrictRealtime"):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"]
    assert "AF_INET" in service["RestrictAddressFamilies"][0].split()
    assert "AF_UNIX" in service["RestrictAddressFamilies"][0].split()  # sd_notify
    assert service["SystemCallFilter"][0] == "@system-service"
    # CPython (ctypes, cffi) needs writable and executable memory.
    assert service.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    # Longer than the drain of open connections on SIGTERM, with a margin
    # for the aborts at its end and the exit.
    assert int(service["TimeoutStopSec"][0].rstrip("s")) >= options["drain-timeout"] + 5


def test_udp_units_say_what_the_issue_asks() -> None:
    socket_ = unitSettings("echoplug-udp.socket")
    dropin = unitSettings(DROPINS[0])
    assert socket_["ListenDatagram"] == ["127.0.0.1:10000"]
    assert socket_["FileDescriptorName"] == ["echoplug-udp"]
    assert socket_["Service"] == ["echoplug.service"]
    assert dropin["Sockets"] == ["echoplug.socket echoplug-udp.socket"]
    reset, execStart = dropin["ExecStart"]
    assert reset == ""
    argv = execStart.split()
    assert argv[3:] == [
        "echoplug", "--port", "systemd:domain=INET:name=echoplug",
        "--port", "systemd-udp:name=echoplug-udp", "--drain-timeout", "5",
    ]
    # The same twistd options as the unit's own ExecStart.
    (own,) = unitSettings("echoplug.service")["ExecStart"]
    assert own.split()[:3] == argv[:3]


def test_units_parse_as_ini() -> None:
    for name in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment, method-assign]
        parser.read_string((DEPLOY / name).read_text())
        assert "Unit" in parser and "Install" in parser


def activate(tmp_path: Path, port: int, endpoint: str, env: dict[str, str]):
    """
    C{systemd-socket-activate} binds 127.0.0.1:PORT and, at the first
    connection, execs twistd with the socket as fd 3. It passes the child
    only the LISTEN_* variables and those named with C{-E}.
    """
    argv = [ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=echoplug"]
    for name in (*env, "PYTHONPATH"):
        argv += ["-E", name]
    argv += [*twistdCommand(), "-n", "--pidfile=", "echoplug", "--port", endpoint]
    return startProcess(argv, tmp_path, testEnv(env))


@pytest.mark.slow
@needsActivate
@pytest.mark.parametrize("endpoint", [
    "systemd:domain=INET:name=echoplug",
    "systemd:domain=INET:index=0",
])
def test_socket_activation_echoes(tmp_path, endpoint: str) -> None:
    port = freePort()
    receiver = NotifyReceiver(str(tmp_path / "notify"))
    server = activate(tmp_path, port, endpoint, receiver.env)
    try:
        server.waitFor(rf"Listening on 127\.0\.0\.1:{port}")
        # The first connection waits in the backlog while twistd starts.
        payload = b"activated by the service manager\n" * 4096
        assert echoHalfClose(port, [payload]) == payload
        server.waitFor(rf"listening on 127\.0\.0\.1:{port}, reactor=")
        receiver.waitFor("READY=1")
        assert echoHalfClose(port, [b"again"]) == b"again"
        server.waitFor(r"close 127\.0\.0\.1:\d+ after [\d.]+s, "
                       r"5 bytes received, 5 bytes sent, closed")
        # twistd replaced systemd-socket-activate (exec), so this stops twistd.
        assert server.stop() in (0, -15)
        receiver.waitFor("STOPPING=1")
    finally:
        server.stop()
        receiver.close()
    assert "Traceback" not in server.output()


@pytest.mark.slow
@needsActivate
def test_socket_activation_wrong_name_is_one_line(tmp_path) -> None:
    port = freePort()
    server = activate(tmp_path, port, "systemd:domain=INET:name=other", {})
    try:
        server.waitFor(rf"Listening on 127\.0\.0\.1:{port}")
        connect(port).close()  # starts twistd, which finds no such socket
        assert server.proc.wait(30) != 0
    finally:
        server.stop()
    out = server.output()
    assert "Traceback" not in out
    assert "--port systemd:domain=INET:name=other: no such socket was passed" in out


@pytest.mark.slow
def test_under_twist_with_text_logs(tmp_path) -> None:
    """
    C{twist} instead of twistd: it writes JSON when stdout is not a TTY (as
    under systemd) unless told C{--log-format=text}, and it never calls
    C{privilegedStartService}; the listeners bind anyway, and READY=1 is sent.
    """
    twist = Path(twistdCommand()[0]).with_name("twist")
    port = freePort()
    receiver = NotifyReceiver(str(tmp_path / "notify"))
    server = startProcess([str(twist), "--log-format=text", "echoplug", "--port", str(port)],
                          tmp_path, receiver.env)
    try:
        receiver.waitFor("READY=1")
        assert echoHalfClose(port, [b"under twist"]) == b"under twist"
        line = server.waitFor(r"close 127\.0\.0\.1:\d+ after [\d.]+s, 11 bytes received")
        assert not line.string.lstrip().startswith("{")
        assert server.stop() in (0, -15)
        receiver.waitFor("STOPPING=1")
    finally:
        server.stop()
        receiver.close()
    assert "listening on 127.0.0.1:" in server.output()


@pytest.mark.slow
@needsActivate
def test_socket_activation_two_addresses_by_index(tmp_path) -> None:
    """
    Two sockets in one unit share its name, so the docs select them by
    index: INET at 0, INET6 at 1. Both echo.
    """
    p4, p6 = freePort(), freePort()
    argv = [ACTIVATE, "-l", f"127.0.0.1:{p4}", "-l", f"[::1]:{p6}", "--fdname=echoplug",
            "-E", "PYTHONPATH", *twistdCommand(), "-n", "--pidfile=", "echoplug",
            "--port", "systemd:domain=INET:index=0", "--port", "systemd:domain=INET6:index=1"]
    server = startProcess(argv, tmp_path)
    try:
        server.waitFor(r"Listening on \[::1\]:")
        assert echoHalfClose(p4, [b"four"]) == b"four"
        server.waitFor(rf"listening on \[::1\]:{p6}, reactor=")
        with socket.create_connection(("::1", p6), timeout=10) as s:
            s.sendall(b"six")
            s.shutdown(socket.SHUT_WR)
            assert recvAll(s) == b"six"
    finally:
        server.stop()
    assert "Traceback" not in server.output()


def activateDatagram(tmp_path: Path, port: int, endpoint: str, fdname: str = "echoplug-udp"):
    """L{activate} for a UDP socket: twistd starts at the first datagram."""
    argv = [ACTIVATE, "--datagram", "-l", f"127.0.0.1:{port}", f"--fdname={fdname}",
            "-E", "PYTHONPATH", *twistdCommand(), "-n", "--pidfile=", "echoplug",
            "--port", endpoint]
    return startProcess(argv, tmp_path)


@pytest.mark.slow
@needsActivate
@pytest.mark.parametrize("endpoint", ["systemd-udp:name=echoplug-udp", "systemd-udp:index=0",
                                      "systemd-udp:domain=INET:name=echoplug-udp"])
def test_socket_activation_of_a_datagram_socket(tmp_path, endpoint: str) -> None:
    port = freePort(socket.SOCK_DGRAM)
    server = activateDatagram(tmp_path, port, endpoint)
    try:
        server.waitFor(rf"Listening on 127\.0\.0\.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(30)
            # The first datagram starts twistd and waits in the socket for it.
            big = b"activated by the service manager\n" * 1000  # over 8192 bytes
            s.sendto(big, ("127.0.0.1", port))
            assert s.recv(1 << 17) == big
            server.waitFor(rf"listening on 127\.0\.0\.1:{port}, reactor=\S+ \(\w+\), UDP")
            s.sendto(b"again", ("127.0.0.1", port))
            assert s.recv(100) == b"again"
    finally:
        server.stop()
    assert "Traceback" not in server.output()


@pytest.mark.slow
@needsActivate
@pytest.mark.parametrize("endpoint, message", [
    ("systemd-udp:name=other", "--port systemd-udp:name=other: no such socket was passed"),
    ("systemd-udp:domain=INET6:index=0", "is not domain=INET6"),
])
def test_socket_activation_of_the_wrong_datagram_socket_is_one_line(
        tmp_path, endpoint: str, message: str) -> None:
    port = freePort(socket.SOCK_DGRAM)
    server = activateDatagram(tmp_path, port, endpoint)
    try:
        server.waitFor(rf"Listening on 127\.0\.0\.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"start", ("127.0.0.1", port))
        assert server.proc.wait(30) != 0
    finally:
        server.stop()
    assert "Traceback" not in server.output()
    assert message in server.output()


@pytest.mark.slow
@needsActivate
def test_stream_socket_given_to_systemd_udp_is_one_line(tmp_path) -> None:
    port = freePort()
    server = activate(tmp_path, port, "systemd-udp:name=echoplug", {})
    try:
        server.waitFor(rf"Listening on 127\.0\.0\.1:{port}")
        connect(port).close()
        assert server.proc.wait(30) != 0
    finally:
        server.stop()
    assert "Traceback" not in server.output()
    assert "is not a UDP socket (ListenDatagram=)" in server.output()
