# -*- test-case-name: tests.test_cload -*-
"""
Build the lab's C programs, shipped as source beside this module, on first
use: the load client (C{cload.c}) and the C epoll echo peer (C{cecho.c}).
Each binary is kept in a cache keyed by its source's digest, so an edited
source is rebuilt and an unchanged one never is.

A C compiler is the only thing they need (C{$CC}, else C{cc}); where there
is none, L{BuildError} says so in one line, and C{echoplug-bench --load
twisted} (without C{--peer c-epoll}) still works.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
WHAT = {"cload": "the C load client", "cecho": "the C echo peer (c-epoll)",
        "cudpecho": "the C UDP echo peer (c-epoll, --workload udp)"}


class BuildError(Exception):
    """A C program of the lab cannot be built here; the message is one line."""


def compiler() -> str | None:
    """The C compiler to use, or C{None} if there is none."""
    return shutil.which(os.environ.get("CC") or "cc")


def cacheDir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "echoplug"


def build(name: str = "cload") -> Path:
    """
    The path of the built program C{name} (C{cload} or C{cecho}), compiling
    it if this source has not been compiled before.

    @raise BuildError: no compiler, or the compile failed.
    """
    path = HERE / f"{name}.c"
    source = path.read_bytes()
    binary = cacheDir() / f"{name}-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.exists():
        return binary
    cc = compiler()
    if cc is None:
        raise BuildError(
            f"no C compiler (cc, or $CC) to build {WHAT[name]}; install one "
            "(apt-get install gcc)" + (" or use --load twisted" if name == "cload" else ""))
    binary.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: two benches starting at once
    # never run a half-written binary.
    fd, temp = tempfile.mkstemp(dir=binary.parent, prefix=f".{name}-")
    os.close(fd)
    try:
        done = subprocess.run([cc, "-O2", "-o", temp, str(path)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
            raise BuildError(f"cannot build {WHAT[name]} with {cc}: {first}")
        os.replace(temp, binary)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return binary
