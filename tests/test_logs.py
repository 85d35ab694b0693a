"""
Tests of L{echoplug.logs}: addresses, level filtering and the JSON format,
in-process and through a real twistd.
"""

from __future__ import annotations

import io
import json

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    textFileLogObserver,
)

from echoplug.logs import JSONLinesObserver, LogLine, formatAddress, makeObserver
from tests.support import connect, recvAll, twistd


def test_format_address() -> None:
    assert formatAddress(IPv4Address("TCP", "127.0.0.1", 80)) == "127.0.0.1:80"
    assert formatAddress(IPv6Address("TCP", "::1", 80)) == "[::1]:80"
    assert formatAddress(UNIXAddress(b"/run/e.sock")) == "/run/e.sock"
    assert formatAddress(UNIXAddress(None)) == "unix"


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


def test_access_line_and_debug_open(tmp_path) -> None:
    with twistd(None, "--log-level", "debug", cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"abc")
            assert s.recv(3) == b"abc"
        server.waitFor(r"open 127\.0\.0\.1:\d+")
        line = server.waitFor(r"close 127\.0\.0\.1:\d+ after [\d.]+s, 3 bytes echoed, closed")
        assert line


def test_default_level_hides_debug(tmp_path) -> None:
    with twistd(None, cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"abcd")
            s.shutdown(1)  # SHUT_WR
            assert recvAll(s) == b"abcd"
        server.waitFor(r"close .* 4 bytes echoed")
    assert " open 127.0.0.1" not in server.output()


def test_warn_level_hides_access_line(tmp_path) -> None:
    with twistd(None, "--log-level", "warn", cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"abcd")
            assert s.recv(4) == b"abcd"
    assert "bytes echoed" not in server.output()


def test_json_format_through_twistd(tmp_path) -> None:
    with twistd(None, "--log-format", "json", cwd=tmp_path) as server:
        with connect(server.port) as s:
            s.sendall(b"abcde")
            assert s.recv(5) == b"abcde"
        server.waitFor(r'"bytes": 5')
    events = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert events, server.output()
    closes = [e for e in events if e.get("bytes") == 5]
    assert closes and closes[0]["level"] == "info"
    assert closes[0]["peer"].startswith("127.0.0.1:")
    assert "5 bytes echoed" in closes[0]["message"]
    assert closes[0]["namespace"].startswith("echoplug")


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
    ("close {peer} after {duration:.3f}s, {bytes} bytes echoed, {why}",
     {"peer": "[::1]:5", "duration": 0.0123456, "bytes": 10**12, "why": "idle timeout"}),
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
    assert set(fast) - set(stock) == {"log_flattened"}
    for key in stock:
        if key != "log_time":
            assert fast[key] == stock[key], key
    assert formatEvent(fast) == formatEvent(stock)
    fast["log_time"] = stock["log_time"]
    for observer in (textFileLogObserver, JSONLinesObserver):
        outs = [io.StringIO(), io.StringIO()]
        observer(outs[0])(stock)
        observer(outs[1])(fast)
        assert outs[0].getvalue() == outs[1].getvalue()
    # Twisted's JSON round trip (jsonFileLogObserver) keeps the text too.
    assert formatEvent(eventFromJSON(eventAsJSON(fast))) == formatEvent(stock)


def test_pinned_twisted_formats_from_log_flattened() -> None:
    """
    The saving rests on formatEvent using log_flattened when present, with
    Twisted's key names: prove it reads the pre-rendered text, not the fields.
    """
    _, fast = both(*LINES[0])
    fast["peer"] = "someone else"
    assert formatEvent(fast).startswith("close [::1]:5 after 0.012s, 1000000000000 bytes")


def test_log_line_rejects_what_it_cannot_prerender() -> None:
    with pytest.raises(ValueError):
        LogLine(Logger(), LogLevel.info, "{peer.host}")
    with pytest.raises(ValueError):
        LogLine(Logger(), LogLevel.info, "{call()}")
