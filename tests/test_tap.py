"""
Tests of L{echoplug.tap}: option parsing and its errors, in-process and as
a user sees them from twistd (one line, non-zero exit, no traceback).
"""

from __future__ import annotations

import subprocess

import pytest

from echoplug.tap import Options, endpointDescription, makeService
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
    ],
)
def test_bad_options_exit_with_one_line(args: list[str], words: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*args)
    message = str(e.value.code)
    assert words in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "args",
    [["--port", "abc"], ["--port", "99999"], ["--port", "nope:1"], ["--wat"],
     ["--port", "systemd:domain=INET:index=0"]],
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


def test_twistd_lists_the_plugin(tmp_path) -> None:
    result = subprocess.run([*twistdCommand(), "--help"], cwd=tmp_path, env=testEnv(),
                            capture_output=True, text=True, timeout=30)
    assert "echoplug" in result.stdout


def test_help_lists_every_option(tmp_path) -> None:
    result = subprocess.run([*twistdCommand(), "echoplug", "--help"], cwd=tmp_path,
                            env=testEnv(), capture_output=True, text=True, timeout=30)
    for option in ("--port", "--trace", "--log-level", "--log-format"):
        assert option in result.stdout
