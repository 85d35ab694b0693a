# -*- test-case-name: tests.test_logs -*-
"""
Log levels, the access-log line and the observers behind C{--log-format}.

echoplug checks its own level before it builds an event: the access line is
on the per-connection path, and an event that an observer would drop still
costs its formatting. The observers filter Twisted's own events the same way.
"""

from __future__ import annotations

import json
import string
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
FORMATS = ("text", "json")


class LogLine:
    """
    One kind of log line, emitted often (the access log: once per
    connection), at a fraction of C{Logger.info}'s cost and with the same
    result for every observer.

    Rendering C{"close {peer} after {duration:.3f}s, ..."} through Twisted's
    C{formatEvent} runs the pure-Python C{string.Formatter} on every event,
    and C{Logger.emit} re-validates the level each time: together a third of
    echoplug's CPU per short connection. L{LogLine} parses the format once,
    renders the fields with the builtin C{format()} into the event's
    C{log_flattened} (Twisted's own slot for pre-rendered fields, which
    C{formatEvent} and C{eventAsJSON} use when present), and hands the same
    event C{Logger.emit} would build straight to the logger's observer.
    tests/test_logs.py checks that every observer sees the same text and the
    same keys as with C{Logger.info}.
    """

    def __init__(self, logger: Logger, level: LogLevel, format: str) -> None:
        self.logger = logger
        self.level = level
        self.format = format
        self.plan: list[tuple[str, str, str, str | None]] = []
        seen: dict[str, int] = {}
        for _, name, spec, conversion in string.Formatter().parse(format):
            if name is None:
                continue
            if not name.isidentifier():
                raise ValueError(f"LogLine fields are plain names, not {name!r}")
            # The key Twisted's flattener gives a field: "name!conversion:spec",
            # with "/N" for its Nth repetition.
            key = f"{name}!{conversion or 's'}:{spec or ''}"
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                key += f"/{seen[key]}"
            self.plan.append((key, name, spec or "", conversion))

    def __call__(self, **fields: Any) -> None:
        flat = {}
        for key, name, spec, conversion in self.plan:
            value = fields[name]
            if conversion == "r":
                value = repr(value)
            elif conversion == "s":
                value = str(value)
            flat[key] = format(value, spec)
        logger = self.logger
        fields["log_flattened"] = flat
        fields["log_logger"] = logger
        fields["log_level"] = self.level
        fields["log_namespace"] = logger.namespace
        fields["log_source"] = logger.source
        fields["log_format"] = self.format
        fields["log_time"] = time.time()
        logger.observer(fields)


def formatAddress(address: object) -> str:
    """
    Render an address as people write it: C{host:port}, C{[v6]:port} or the
    socket path (C{unix} for an unnamed client end).
    """
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return name or "unix"
    return str(address)


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    One flat JSON object per line: C{time} (ISO 8601, UTC), C{level},
    C{namespace}, C{message} (the formatted text) and the event's own fields
    (C{peer}, C{bytes}, ...). Twisted's C{jsonFileLogObserver} keeps only the
    format string and nests the level, which log shippers cannot use as is.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC)
            .isoformat(timespec="milliseconds"),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record:
                record[key] = value if isinstance(value, JSONSCALARS) else str(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()


JSONSCALARS = (str, int, float, bool, type(None))


def makeObserver(
    fmt: str = "text", level: str = "info", out: IO[str] | None = None
) -> ILogObserver:
    """
    An observer writing to C{out} (stdout by default, which journald reads):
    plain text lines, or one JSON object per line for C{fmt="json"}. Events
    below C{level} are dropped.
    """
    out = sys.stdout if out is None else out
    if fmt == "json":
        base = JSONLinesObserver(out)
    else:
        base = textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(base, [predicate])
