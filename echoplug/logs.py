# -*- test-case-name: tests.test_logs -*-
"""
Log levels, the access-log line and the observers behind C{--log-format}.

echoplug checks its own level before it builds an event: the access line is
on the per-connection path, and an event that an observer would drop still
costs its formatting. The observers filter Twisted's own events the same way.

The access line is also why echoplug brings its own text observer. twistd's
(C{textFileLogObserver}) spends about 40 µs on each line, half of what a
whole short connection costs stock C{wire.Echo}: two C{datetime}s and a
C{strftime} for the timestamp, and C{flatFormat} for the message. echoplug's
L{textObserver} writes the same bytes to the same file, with the timestamp
rendered once per second and the access line's text rendered once, by
L{LogLine}. Which file that is, twistd decides (L{twistdObserver}), so C{-l},
C{--logfile}, SIGUSR1 rotation and daemon mode keep working, for
C{--log-level} and C{--log-format} too; C{--syslog} stays twistd's (echoplug
only filters it by C{--log-level}), and so does a C{--logger} of your own.
"""

from __future__ import annotations

import json
import string
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from zope.interface import implementer

from echoplug._twisted import observerFile, twistdLogObserver

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

    The event also carries the whole message, rendered once, under
    L{TEXT_KEY}, for L{textObserver} to write without formatting it again.
    """

    def __init__(self, logger: Logger, level: LogLevel, format: str) -> None:
        self.logger = logger
        self.level = level
        self.format = format
        # Per field: the literal text before it, its flattened key, name,
        # spec and conversion; then the text after the last field.
        self.plan: list[tuple[str, str, str, str, str | None]] = []
        pending = ""
        seen: dict[str, int] = {}
        for literal, name, spec, conversion in string.Formatter().parse(format):
            pending += literal
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
            self.plan.append((pending, key, name, spec or "", conversion))
            pending = ""
        self.tail = pending
        self.render = self._compile()

    def _compile(self) -> Callable[[dict[str, Any]], tuple[dict[str, str], str]]:
        """
        The plan as one straight-line function of the fields, returning the
        flattened fields and the message: a loop over the plan, with its
        tuple unpacking and branches per field, was a third of a line's cost.
        Only names checked by C{isidentifier} and C{repr}s of strings go
        into its source.
        """
        body, flat, text = [], [], []
        for i, (literal, key, name, spec, conversion) in enumerate(self.plan):
            value = f"fields[{name!r}]"
            if conversion in ("r", "s"):
                value = f"{'repr' if conversion == 'r' else 'str'}({value})"
            body.append(f"    v{i} = format({value}, {spec!r})")
            flat.append(f"{key!r}: v{i}")
            text += [repr(literal), f"v{i}"]
        text.append(repr(self.tail))
        source = (f"def render(fields):\n{chr(10).join(body)}\n"
                  f"    return {{{', '.join(flat)}}}, ''.join(({', '.join(text)},))\n")
        namespace: dict[str, Any] = {"format": format, "str": str, "repr": repr}
        exec(compile(source, f"<LogLine {self.format!r}>", "exec"), namespace)
        render: Callable[[dict[str, Any]], tuple[dict[str, str], str]] = namespace["render"]
        return render

    def __call__(self, **fields: Any) -> None:
        logger = self.logger
        fields["log_flattened"], fields[TEXT_KEY] = self.render(fields)
        fields["log_logger"] = logger
        fields["log_level"] = self.level
        fields["log_namespace"] = logger.namespace
        fields["log_source"] = logger.source
        fields["log_format"] = self.format
        fields["log_time"] = time.time()
        logger.observer(fields)


#: The event key under which L{LogLine} leaves its message, rendered. It
#: starts with C{log_} so that observers that print an event's own fields
#: (L{JSONLinesObserver}) leave it out, as they leave out C{log_flattened}.
TEXT_KEY = "log_echoplug_text"


class CachedTime:
    """
    Twisted's C{formatTime(when)} for the RFC 3339 format twistd uses,
    rendered once per second: the text depends only on the whole second
    (and the local zone then), and a busy server logs many lines a second.
    """

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def __call__(self, when: float | None) -> str:
        if when is None or when < 0 or when - int(when) > 0.999999:
            # datetime rounds to the microsecond, so the last microsecond of
            # a second may print as the next one: leave that to Twisted.
            return formatTime(when, timeFormatRFC3339)
        second = int(when)
        if second != self.second:
            self.text = formatTime(second, timeFormatRFC3339)
            self.second = second
        return self.text


class ClassicText:
    """
    C{formatEventAsClassicLogText} as twistd's own observer calls it, byte
    for byte, only cheaper: the timestamp comes from L{CachedTime} and an
    event from L{LogLine} is not formatted again.
    """

    def __init__(self) -> None:
        self.formatTime = CachedTime()
        # "namespace#level" by (namespace, level): a few kinds of line.
        self.systems: dict[tuple[Any, Any], str] = {}

    def __call__(self, event: LogEvent) -> str | None:
        text = event.get(TEXT_KEY)
        if text is None or "log_failure" in event:
            return formatEventAsClassicLogText(event, formatTime=self.formatTime)
        if not text:
            return None
        system = event.get("log_system")  # set by a --workers worker (WorkerTag)
        if system is None:
            namespace, level = event.get("log_namespace", "-"), event.get("log_level")
            system = self.systems.get((namespace, level)) if type(namespace) is str else None
            if system is None:
                system = f"{namespace}#{'-' if level is None else level.name}"
                if type(namespace) is str and len(self.systems) < 256:
                    self.systems[namespace, level] = system
        line = f"{self.formatTime(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def textObserver(out: IO[Any]) -> FileLogObserver:
    """
    The observer twistd would make for C{out} (C{textFileLogObserver}):
    the same text, a line at a time, flushed after each, at a fraction of
    the cost per line (L{ClassicText}).
    """
    return FileLogObserver(out, ClassicText())


def twistdObserver(serverOptions: Mapping[str, Any], fmt: str = "text",
                   level: str | None = None) -> ILogObserver | None:
    """
    The observer for a server that twistd started with C{serverOptions}, or
    C{None} to leave logging to twistd.

    twistd decides where the log goes: stdout under C{-n}, C{-l FILE} (a
    C{LogFile}, rotated on SIGUSR1), C{twistd.log} for a daemon, C{--syslog},
    and a one-line exit for a daemon told to log to stdout. echoplug asks
    twistd's own C{UnixAppLogger} rather than repeating those rules, then
    writes to that file with L{textObserver} (or L{JSONLinesObserver} for
    C{fmt="json"}), dropping events below C{level} if one is given. Under
    C{--syslog} it only filters twistd's syslog observer by C{level}; a
    C{--logger} of the user's own is left alone. Asking twistd takes two of
    its private names (L{echoplug._twisted.twistdLogObserver},
    L{echoplug._twisted.observerFile}).

    @raise SystemExit: C{fmt="json"} with C{--syslog} (one line).
    """
    if serverOptions.get("logger"):
        return None
    if serverOptions.get("syslog") and fmt == "json":
        raise SystemExit("twistd echoplug: --log-format json writes a file or stdout; "
                         "it cannot go to --syslog")
    if serverOptions.get("syslog") and level is None:
        return None
    stock = twistdLogObserver(serverOptions)
    if not isinstance(stock, FileLogObserver):
        # syslog: twistd's legacy observer, behind echoplug's level filter.
        predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level or "info"])
        return FilteringLogObserver(LegacyLogObserverWrapper(stock), [predicate])
    if level is None and fmt == "text":
        return textObserver(observerFile(stock))
    return makeObserver(fmt, level or "info", observerFile(stock))


def _escapes() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
    # Bytes that were not UTF-8, as decoding with surrogateescape leaves them.
    table.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})
    # Line and paragraph separators (JSON readers and JavaScript break lines
    # there) and the bidirectional overrides that reorder what a terminal shows.
    for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)):
        table[c] = f"\\u{c:04x}"
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                  ord("\\"): "\\\\"})
    return table


#: What L{escape} rewrites: C0 and C1 control characters, DEL, bytes that
#: were not UTF-8, the Unicode line and paragraph separators and bidi
#: controls, and the backslash that starts an escape.
ESCAPES = _escapes()


def escape(text: str) -> str:
    """
    Make a client-controlled string safe to put in a log line: control
    characters (C0, DEL, C1), undecodable bytes, U+2028, U+2029 and the bidi
    controls become Python-style escapes (C{\\n}, C{\\x1b}, C{\\xff},
    C{\\u2028}), and a backslash is doubled, so the result is one printable
    line that reads back unambiguously.

    Apply it where a client-controlled value enters the log (L{formatAddress}
    for a UNIX peer's path, the PROXY header's addresses, ...), once, rather
    than in each observer: then the text, JSON and syslog outputs all carry
    the same safe value. Values the kernel renders (IP addresses and ports)
    need none, so the TCP access line pays nothing.
    """
    return text.translate(ESCAPES)


def formatAddress(address: object) -> str:
    """
    Render an address as people write it: C{host:port}, C{[v6]:port} or the
    socket path (C{unix} for an unnamed client end, C{@name} for an abstract
    one).

    A UNIX client chooses the path it binds, so a path is passed through
    L{escape}: a newline in it cannot forge a second log line, nor an ESC
    colour the terminal, nor a NUL cut the line.
    """
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        if not name:
            return "unix"
        if name.startswith("\0"):
            # Linux's abstract namespace, written as ss(8) and systemd do.
            return "@" + escape(name[1:])
        return escape(name)
    return escape(str(address))


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
        # ensure_ascii: every control character and every non-ASCII one,
        # U+2028 and U+2029 included, leaves as a \uXXXX escape, so no field
        # can break the line or reach a terminal raw.
        self.out.write(json.dumps(record) + "\n")
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
    base: ILogObserver
    if fmt == "json":
        base = JSONLinesObserver(out)
    else:
        base = textObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(base, [predicate])
