# -*- test-case-name: tests.test_cload -*-
"""
Build the lab's C load client (C{cload.c}, shipped beside this module) on
first use, and keep the binary in a cache keyed by the source's digest, so an
edited source is rebuilt and an unchanged one never is.

A C compiler is the only thing it needs (C{$CC}, else C{cc}); where there is
none, L{BuildError} says so in one line and C{echoplug-bench --load twisted}
still works.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cload.c")


class BuildError(Exception):
    """The C load client cannot be built here; the message is one line."""


def compiler() -> str | None:
    """The C compiler to use, or C{None} if there is none."""
    return shutil.which(os.environ.get("CC") or "cc")


def cacheDir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "echoplug"


def build() -> Path:
    """
    The path of a built C{cload}, compiling it if this source has not
    been compiled before.

    @raise BuildError: no compiler, or the compile failed.
    """
    source = SOURCE.read_bytes()
    binary = cacheDir() / f"cload-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.exists():
        return binary
    cc = compiler()
    if cc is None:
        raise BuildError(
            "no C compiler (cc, or $CC) to build the C load client; install one "
            "(apt-get install gcc) or use --load twisted")
    binary.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: two benches starting at once
    # never run a half-written binary.
    fd, temp = tempfile.mkstemp(dir=binary.parent, prefix=".cload-")
    os.close(fd)
    try:
        done = subprocess.run([cc, "-O2", "-o", temp, str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
            raise BuildError(f"cannot build the C load client with {cc}: {first}")
        os.replace(temp, binary)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return binary
