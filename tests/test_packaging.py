"""What the built package ships: the typing marker (PEP 561), so type checkers read the hints."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_py_typed(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git to copy the tracked sources")
    # build from a copy of the tracked files (no build folders or caches of the checkout)
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.startswith(("cggr_compile/", "passes/")) or name in ("pyproject.toml", "README.md"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("cggr_compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cggr_compile/py.typed" in names, names
    assert "cggr_compile/passes/trace_routed_step.py" in names
