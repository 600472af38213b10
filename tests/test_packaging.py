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


def test_the_package_has_no_import_cycle():
    """No module of cggr_compile imports, at module level or inside a function, one that imports it
    back (config and router used to: they share cggr_compile/model_layout.py now)."""
    import ast

    import cggr_compile

    root = Path(cggr_compile.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cggr_compile"):
                found.add(node.module)
        imports[name] = found
    pairs = sorted((a, b) for a, deps in imports.items() for b in deps
                   if a < b and a in imports.get(b, ()) and "__init__" not in (a, b) and b != "cggr_compile"
                   and a != "cggr_compile")
    assert not pairs, pairs
