"""
Tests of L{echoplug.tap}: option parsing and its errors, in-process and as
a user sees them from twistd (one line, non-zero exit, no traceback).
"""

from __future__ import annotations

import subprocess

import pytest

from echoplug.factory import Keepalive
from echoplug.tap import Options, endpointDescription, makeService, size, withDefaults
from tests.support import testEnv, twistdCommand


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_bare_port_is_loopback_tcp() -> None:
    assert endpointDescription("10000") == "tcp:10000:interface=127.0.0.1"
    assert endpointDescription("tcp6:10000") == "tcp6:10000"


def test_default_port() -> None:
    assert parse()["ports"] == ["tcp:10000:interface=127.0.0.1"]


def test_port_repeats() -> None:
    options = parse("--port", "10001", "-p", "unix:/tmp/x.sock")
    assert options["ports"] == ["tcp:10001:interface=127.0.0.1", "unix:/tmp/x.sock"]
    service = makeService(options)
    assert len(list(service)) == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "abc"], "not a port number"),
        (["--port", "-1"], "0 to 65535"),
        (["--port", "65536"], "0 to 65535"),
        (["--port", "bogus:1"], "Unknown endpoint type"),
        (["--port", "tcp:notanumber"], "--port tcp:notanumber"),
        (["--log-level", "loud"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--nonsense"], "not recognized"),
        (["--idle-timeout", "-1"], "0 or more"),
        (["--idle-timeout", "soon"], "not a number of seconds"),
        (["--idle-timeout", "inf"], "0 or more"),
        (["--drain-timeout", "-0.5"], "0 or more"),
        (["--drain-timeout", "nan"], "0 or more"),
        (["--max-connections", "0"], "1 or more"),
        (["--max-connections", "-5"], "1 or more"),
        (["--max-connections", "lots"], "not a whole number"),
        (["--max-connections-per-peer", "0"], "1 or more"),
        (["--max-connections-per-peer", "2.5"], "not a whole number"),
        (["--max-buffered", "12Q"], "not a size in bytes"),
        (["--max-buffered", "-1M"], "not a size in bytes"),
        (["--max-buffered", "1.5M"], "not a size in bytes"),
        (["--peer-prefix", "33,64"], "1 to 32 bits"),
        (["--peer-prefix", "24,129"], "1 to 128"),
        (["--peer-prefix", "0,64"], "1 to 32 bits"),
        (["--peer-prefix", "24"], "two prefix lengths"),
        (["--peer-prefix", "a,b"], "two prefix lengths"),
        (["--keepalive", "-1"], "0 (off) to 32767"),
        (["--keepalive", "40000"], "0 (off) to 32767"),
        (["--keepalive", "soon"], "not a whole number of seconds"),
        (["--backlog", "0"], "1 or more"),
        (["--backlog", "many"], "not a whole number"),
    ],
)
def test_bad_options_exit_with_one_line(args: list[str], words: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*args)
    message = str(e.value.code)
    assert words in message
    assert "\n" not in message


def test_limits_parsed() -> None:
    options = parse("--idle-timeout", "30", "--max-connections", "100",
                    "--max-connections-per-peer", "4", "--drain-timeout", "0")
    factory = makeService(options).factory
    assert (factory.idleTimeout, factory.maxConnections, factory.maxPerPeer) == (30.0, 100, 4)
    assert makeService(options).drainTimeout == 0.0
    defaults = parse()
    assert (defaults["idle-timeout"], defaults["max-connections"],
            defaults["max-connections-per-peer"], defaults["drain-timeout"]) == (
        None, None, None, 5.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["--port", "abc"],  # non-numeric
        ["--port", "-1"],  # negative
        ["--port", "99999"],  # out of range
        ["--port", "nope:1"],  # unknown endpoint type
        ["--port", "tcp:port=x"],  # bad endpoint argument
        ["--wat"],  # unknown flag
        ["--port", "systemd:domain=INET:index=0"],
        ["--idle-timeout", "-3"],  # negative timeout
        ["--idle-timeout", "x"],
        ["--drain-timeout", "-1"],
        ["--max-connections", "0"],  # zero cap
        ["--max-connections", "-2"],  # negative cap
        ["--max-connections-per-peer", "0"],
        ["--max-connections-per-peer", "-1"],
        ["--idle-timeout"],  # missing value
        ["--max-buffered", "12Q"],
        ["--peer-prefix", "33,64"],
        ["--keepalive", "-5"],
        ["--backlog", "0"],
    ],
)
def test_twistd_usage_errors(tmp_path, args: list[str]) -> None:
    result = subprocess.run(
        [*twistdCommand(), "-n", "--pidfile=", "echoplug", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=30, env=testEnv(),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("twistd echoplug: ")


@pytest.mark.slow
def test_twistd_lists_the_plugin(tmp_path) -> None:
    result = subprocess.run([*twistdCommand(), "--help"], cwd=tmp_path, env=testEnv(),
                            capture_output=True, text=True, timeout=30)
    assert "echoplug" in result.stdout


@pytest.mark.slow
def test_help_lists_every_option(tmp_path) -> None:
    result = subprocess.run([*twistdCommand(), "echoplug", "--help"], cwd=tmp_path,
                            env=testEnv(), capture_output=True, text=True, timeout=30)
    for option in ("--port", "--trace", "--log-level", "--log-format", "--idle-timeout",
                   "--max-connections", "--max-connections-per-peer", "--drain-timeout",
                   "--max-buffered", "--backlog", "--keepalive", "--peer-prefix"):
        assert option in result.stdout


@pytest.mark.parametrize(("text", "number"), [
    ("65536", 65536), ("64K", 64 << 10), ("64k", 64 << 10), ("64M", 64 << 20),
    ("64MiB", 64 << 20), ("64MB", 64 << 20), ("1G", 1 << 30), (" 32M ", 32 << 20), ("0", 0),
])
def test_sizes(text: str, number: int) -> None:
    assert size("--max-buffered", text) == number


def test_hardening_defaults() -> None:
    options = parse()
    factory = makeService(options).factory
    assert factory.bound is not None and factory.bound.limit == 64 << 20
    assert factory.keepalive == Keepalive(300, 15, 4)
    assert factory.keepalive.userTimeout == 360_000
    assert factory.peerPrefix == (32, 64)
    with open("/proc/sys/net/core/somaxconn") as f:
        assert options["backlog"] == min(4096, int(f.read()))
    factory = makeService(parse("--max-buffered", "0", "--keepalive", "0",
                                "--peer-prefix", "24,48", "--backlog", "100")).factory
    assert (factory.bound, factory.keepalive, factory.peerPrefix) == (None, None, (24, 48))
    assert Keepalive.after(1) == Keepalive(1, 1, 4)


def test_endpoint_defaults_only_where_not_given() -> None:
    assert withDefaults("tcp:10000:interface=127.0.0.1", 4096) == (
        "tcp:10000:interface=127.0.0.1:backlog=4096")
    assert withDefaults("tcp:10000:backlog=7", 4096) == "tcp:10000:backlog=7"
    assert withDefaults("tcp6:port=10000", 99) == "tcp6:port=10000:backlog=99"
    assert withDefaults("unix:/run/e.sock", 4096) == "unix:/run/e.sock:backlog=4096:mode=660"
    assert withDefaults("UNIX:/run/e.sock:mode=600", 8) == "UNIX:/run/e.sock:mode=600:backlog=8"
    assert withDefaults("unix:address=/x\\:y.sock", 8) == (
        "unix:address=/x\\:y.sock:backlog=8:mode=660")
    assert withDefaults("systemd:domain=INET:index=0", 8) == "systemd:domain=INET:index=0"
    assert withDefaults("ssl:443:privateKey=k.pem", 8) == "ssl:443:privateKey=k.pem:backlog=8"
