"""
Tests of L{echoplug.logs}: addresses, level filtering, the JSON format and
the cheaper text observer (same bytes as twistd's), in-process and through a
real twistd.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    formatTime,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from echoplug.logs import (
    TEXT_KEY,
    CachedTime,
    ClassicText,
    JSONLinesObserver,
    LogLine,
    escape,
    formatAddress,
    makeObserver,
    textObserver,
    twistdObserver,
)
from tests.support import (
    connect,
    freePort,
    recvAll,
    startProcess,
    twistd,
    twistdCommand,
    waitForPort,
)


def test_format_address() -> None:
    assert formatAddress(IPv4Address("TCP", "127.0.0.1", 80)) == "127.0.0.1:80"
    assert formatAddress(IPv6Address("TCP", "::1", 80)) == "[::1]:80"
    assert formatAddress(UNIXAddress(b"/run/e.sock")) == "/run/e.sock"
    assert formatAddress(UNIXAddress(None)) == "unix"
    assert formatAddress(UNIXAddress(b"\0abstract")) == "@abstract"
    assert formatAddress(UNIXAddress(b"/x\nclose 1.2.3.4:5\x1b[31m\xff\\")) == (
        "/x\\nclose 1.2.3.4:5\\x1b[31m\\xff\\\\")
    assert formatAddress(UNIXAddress("/x\u2028y\x00")) == "/x\\u2028y\\x00"


#: What may never reach a log raw: control characters (C0, DEL, C1) and the
#: Unicode line and paragraph separators.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@given(st.text())
def test_escape_leaves_one_safe_line(text: str) -> None:
    escaped = escape(text)
    assert not UNSAFE.search(escaped)
    # Nothing else changes: printable text without backslashes is kept.
    if not UNSAFE.search(text) and "\\" not in text and not re.search(
            "[\udc80-\udcff\u202a-\u202e\u2066-\u2069]", text):
        assert escaped == text


@given(st.text(), st.text())
def test_escape_is_unambiguous(a: str, b: str) -> None:
    if a != b:
        assert escape(a) != escape(b)


def test_json_escapes_what_a_field_carries() -> None:
    out = io.StringIO()
    evil = "a\u2028b\u2029c\x1bd\x85e\x00f\né"
    Logger(namespace="t", observer=makeObserver("json", "info", out)).info(
        "got {thing}", thing=evil)
    line = out.getvalue()
    assert line.count("\n") == 1 and line.endswith("\n")
    assert not UNSAFE.search(line[:-1])
    assert not re.search("[^\x20-\x7e]", line[:-1])  # ASCII only
    event = json.loads(line)
    assert event["thing"] == evil and event["message"] == f"got {evil}"


def test_level_filter_and_json() -> None:
    out = io.StringIO()
    log = Logger(namespace="t", observer=makeObserver("json", "warn", out))
    log.info("quiet {x}", x=1)
    log.warn("loud {x}", x=2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["x"] == 2
    assert event["level"] == "warn"
    assert event["message"] == "loud 2"
    assert event["namespace"] == "t"


def test_text_observer() -> None:
    out = io.StringIO()
    log = Logger(namespace="t", observer=makeObserver("text", "info", out))
    log.debug("hidden")
    log.info("shown {x}", x=3)
    assert "shown 3" in out.getvalue()
    assert "hidden" not in out.getvalue()


@pytest.mark.slow
def test_access_line_and_debug_open(tmp_path) -> None:
    with twistd(None, "--log-level", "debug", cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"abc")
            assert s.recv(3) == b"abc"
        server.waitFor(r"open 127\.0\.0\.1:\d+")
        line = server.waitFor(r"close 127\.0\.0\.1:\d+ after [\d.]+s, "
                              r"3 bytes received, 3 bytes sent, closed")
        assert line


@pytest.mark.slow
def test_default_level_hides_debug(tmp_path) -> None:
    with twistd(None, cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"abcd")
            s.shutdown(1)  # SHUT_WR
            assert recvAll(s) == b"abcd"
        server.waitFor(r"close .* 4 bytes received, 4 bytes sent")
    assert " open 127.0.0.1" not in server.output()


@pytest.mark.slow
def test_warn_level_hides_access_line(tmp_path) -> None:
    with twistd(None, "--log-level", "warn", cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"abcd")
            assert s.recv(4) == b"abcd"
    assert "bytes received" not in server.output()


@pytest.mark.slow
def test_json_format_through_twistd(tmp_path) -> None:
    with twistd(None, "--log-format", "json", cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"abcde")
            assert s.recv(5) == b"abcde"
        server.waitFor(r'"received": 5')
    events = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert events, server.output()
    closes = [e for e in events if e.get("received") == 5]
    assert closes and closes[0]["level"] == "info"
    assert closes[0]["peer"].startswith("127.0.0.1:")
    assert closes[0]["sent"] == 5
    assert "5 bytes received, 5 bytes sent" in closes[0]["message"]
    assert closes[0]["namespace"].startswith("echoplug")


@pytest.mark.slow
def test_trace_logs_like_the_original(tmp_path) -> None:
    with twistd(None, "--trace", cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"ping")
            s.shutdown(1)  # SHUT_WR
            assert recvAll(s) == b"ping"
        server.waitFor(r"connection from 127\.0\.0\.1:\d+")
        server.waitFor(r"received b'ping' from 127\.0\.0\.1:\d+")
        server.waitFor(r"sending b'ping' to 127\.0\.0\.1:\d+")
        server.waitFor(r"closing 127\.0\.0\.1:\d+ after reading no data")


class Source:
    log = Logger()


LINES = [
    ("close {peer} after {duration:.3f}s, {received} bytes received, {sent} bytes sent, {why}",
     {"peer": "[::1]:5", "duration": 0.0123456, "received": 10**12, "sent": 10**12 - 1,
      "why": "idle timeout"}),
    ("open {peer}", {"peer": "/run/echo.sock"}),
    ("{a!r} {a!s} {a} {a:>6} {b:08.2f} {{literal}}", {"a": "x'y", "b": -1.5}),
    ("no fields at all", {}),
]


def both(format: str, fields: dict[str, object]) -> tuple[dict, dict]:
    """The event of Logger.info and that of LogLine, for the same line."""
    events: list[dict] = []
    publisher = LogPublisher(events.append)
    logger = Logger(namespace="echoplug.t", source=Source(), observer=publisher)
    logger.info(format, **fields)
    LogLine(logger, LogLevel.info, format)(**fields)
    return events[0], events[1]


@pytest.mark.parametrize(("format", "fields"), LINES)
def test_log_line_event_is_logger_info_event(format: str, fields: dict[str, object]) -> None:
    """Every observer sees the same text and the same keys as with Logger.info."""
    stock, fast = both(format, fields)
    assert set(fast) - set(stock) == {"log_flattened", TEXT_KEY}
    for key in stock:
        if key != "log_time":
            assert fast[key] == stock[key], key
    assert formatEvent(fast) == formatEvent(stock)
    assert fast[TEXT_KEY] == formatEvent(stock)
    fast["log_time"] = stock["log_time"]
    for observer in (textFileLogObserver, textObserver, JSONLinesObserver):
        outs = [io.StringIO(), io.StringIO()]
        observer(outs[0])(stock)
        observer(outs[1])(fast)
        assert outs[0].getvalue() == outs[1].getvalue()
    # Twisted's JSON round trip (jsonFileLogObserver) keeps the text too.
    assert formatEvent(eventFromJSON(eventAsJSON(fast))) == formatEvent(stock)


def test_log_line_rejects_what_it_cannot_prerender() -> None:
    with pytest.raises(ValueError):
        LogLine(Logger(), LogLevel.info, "{peer.host}")
    with pytest.raises(ValueError):
        LogLine(Logger(), LogLevel.info, "{call()}")


# echoplug's text observer: the same bytes as twistd's, cheaper.

@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), max_size=20))
def test_cached_time_is_format_time(whens: list[float]) -> None:
    cached = CachedTime()
    for when in [*whens, *sorted(whens)]:
        assert cached(when) == formatTime(when)
    assert cached(None) == formatTime(None)


def stockLine(event: dict) -> str | None:
    """What twistd's own text observer writes for C{event}."""
    out = io.StringIO()
    textFileLogObserver(out)(event)
    return out.getvalue() or None


@pytest.mark.parametrize(("format", "fields"), [*LINES, ("", {}), ("{x}", {"x": "a\nb"})])
def test_classic_text_matches_twistd_for_log_lines(format: str, fields: dict) -> None:
    events: list[dict] = []
    logger = Logger(namespace="echoplug.t", observer=events.append)
    line = LogLine(logger, LogLevel.info, format)
    line(**fields)
    event = events[0]
    assert ClassicText()(event) == stockLine(event)
    # The cheap path is only for what it can render: anything else falls
    # back to Twisted's formatter, and still matches.
    for extra in ({"log_system": "Echo,3,127.0.0.1"}, {"log_level": None},
                  {"log_failure": Failure(ValueError("x"))}):
        changed = {**event, **extra}
        assert ClassicText()(changed) == stockLine(changed)


def test_classic_text_matches_twistd_for_other_events() -> None:
    events: list[dict] = []
    logger = Logger(namespace="t", observer=events.append)
    logger.info("plain {x!r}", x=b"\x00")
    logger.warn("with\nnewline")
    try:
        raise ZeroDivisionError("x")
    except ZeroDivisionError:
        logger.failure("boom")
    events.append({"log_format": "legacy", "log_system": "-", "log_time": time.time()})
    events.append({"no": "format"})
    for event in events:
        assert ClassicText()(event) == stockLine(event)


def test_twistd_observer_follows_twistds_choice(tmp_path: Path) -> None:
    stdout = twistdObserver({"nodaemon": True, "logfile": ""})
    assert isinstance(stdout, FileLogObserver) and stdout._outFile is sys.stdout
    path = tmp_path / "echo.log"
    observer = twistdObserver({"nodaemon": True, "logfile": str(path)})
    Logger(namespace="t", observer=observer).info("to the file {n}", n=1)
    assert path.read_text().endswith("[t#info] to the file 1\n")
    filtered = twistdObserver({"nodaemon": True, "logfile": str(path)}, "json", "warn")
    assert isinstance(filtered, FilteringLogObserver)
    assert twistdObserver({"logger": "some.factory"}) is None
    assert twistdObserver({"syslog": True, "prefix": "echo"}) is None
    assert isinstance(twistdObserver({"syslog": True, "prefix": "echo"}, "text", "warn"),
                      FilteringLogObserver)
    with pytest.raises(SystemExit, match=r"json.*--syslog"):
        twistdObserver({"syslog": True}, "json", "info")
    with pytest.raises(SystemExit, match="Daemons cannot log to stdout"):
        twistdObserver({"logfile": "-", "nodaemon": False})


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["--log-level", "debug"], ["--log-format", "json"]])
def test_access_line_goes_to_twistds_logfile(tmp_path: Path, options: list[str]) -> None:
    """twistd -l FILE: the access line (and the rest) land in FILE, not stdout."""
    port = freePort()
    argv = [*twistdCommand(), "-n", "--pidfile=", "-l", "echo.log", "echoplug",
            "--port", f"tcp:{port}:interface=127.0.0.1", *options]
    server = startProcess(argv, tmp_path)
    try:
        waitForPort(server, port)
        with connect(port) as s:
            s.sendall(b"abc")
            assert recvAll(s, 3) == b"abc"
        log = tmp_path / "echo.log"
        deadline = time.monotonic() + 10
        while "3 bytes received" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert "3 bytes received, 3 bytes sent" in text
        assert "listening on 127.0.0.1" in text
        if "debug" in options:
            assert "open 127.0.0.1:" in text
    finally:
        server.stop()
    assert "bytes received" not in server.output()


EVIL = "x\nclose 6.6.6.6:1 after 0.001s, 1 bytes received, closed\r\x1b[31m\u2028!"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("abstract", [False, True])
def test_a_unix_peer_cannot_forge_log_lines(tmp_path: Path, fmt: str, abstract: bool) -> None:
    """
    A UNIX client names itself: the path it binds is the logged peer. Its
    newlines, CRs, ESCs, NULs and U+2028 reach neither log format raw.
    """
    short = Path(tempfile.mkdtemp(prefix="ep", dir="/tmp"))  # sun_path: 108 bytes
    path = tmp_path / "echo.sock"
    with twistd(None, "--port", f"unix:{path}", "--log-level", "debug", "--log-format", fmt,
                cwd=tmp_path, wait=False) as server:
        server.waitFor(r"listening on")
        name: str | bytes = ("\0" + EVIL + "\0nul").encode() if abstract else str(short / EVIL)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(name)
            s.connect(str(path))
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        server.waitFor("bytes sent")
    out = server.output()
    assert not UNSAFE.search(out.replace("\n", ""))
    assert "6.6.6.6" in out  # the forged text is there, escaped, inside the real line
    forged = [line for line in server.lines if "6.6.6.6" in line]
    assert len(forged) == 2  # open and close, each one line
    shutil.rmtree(short)
    expected = ("@" + escape(EVIL) + "\\x00nul") if abstract else escape(str(short / EVIL))
    for line in forged:
        if fmt == "json":
            assert json.loads(line)["peer"] == expected
        else:
            assert expected in line
