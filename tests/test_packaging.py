"""
Packaging: the wheel carries the dropin but never C{twisted/__init__.py},
C{twisted/plugins/__init__.py} or C{dropin.cache}, and the installed
package (editable or not) is found by twistd from any directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT, twistdCommand


@pytest.mark.slow
def test_wheel_contents(tmp_path) -> None:
    pytest.importorskip("hatchling")
    # A dropin.cache in the tree (twistd writes one) must not reach the wheel.
    cache = ROOT / "twisted" / "plugins" / "dropin.cache"
    made = not cache.exists()
    if made:
        cache.write_bytes(b"stale")
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "-q", "-w", str(tmp_path), str(ROOT)],
            check=True, capture_output=True, timeout=120,
        )
    finally:
        if made:
            cache.unlink()
    (wheel,) = tmp_path.glob("echoplug-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/echoplug_plugin.py" in names
    assert "twisted/plugins/echoplug_reactors.py" in names
    assert "echoplug/reactors/epoll.py" in names
    assert "echoplug/tap.py" in names
    assert "echoplug/lab/cload.c" in names  # the lab builds it on first use
    assert not {n for n in names if n.endswith("dropin.cache")}
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names


@pytest.mark.slow
def test_installed_plugin_found_from_any_directory(tmp_path) -> None:
    """With no PYTHONPATH and a foreign cwd, twistd still lists echoplug."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([*twistdCommand(), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert "echoplug" in result.stdout, "is echoplug installed (pip install -e .)?"


def test_no_package_init_in_twisted_namespace() -> None:
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    dropin = (ROOT / "twisted" / "plugins" / "echoplug_plugin.py").read_text()
    imports = [line for line in dropin.splitlines() if line.startswith(("import", "from"))]
    assert imports == ["from twisted.application.service import ServiceMaker"]
    # The reactor dropin is read before any reactor is installed: it may
    # import nothing that touches one.
    dropin = (ROOT / "twisted" / "plugins" / "echoplug_reactors.py").read_text()
    imports = [line for line in dropin.splitlines() if line.startswith(("import", "from"))]
    assert imports == ["from twisted.application.reactors import Reactor"]


def test_gitignore_keeps_dropin_cache_out() -> None:
    assert "dropin.cache" in Path(ROOT / ".gitignore").read_text()
