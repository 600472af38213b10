"""Helpers shared by the benchmark scripts: the library import, how a device is named in results and
file names, timing summaries."""

from __future__ import annotations

import os
import platform
import re
import statistics
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch

# How to make a checkout importable: ``passes/`` installs as ``cggr_compile.passes`` (pyproject's
# package-dir), so a checkout that is not installed has no ``cggr_compile.passes``.
INSTALL_COMMAND = "python -m pip install --no-deps -e ."


def require_cggr_compile() -> ModuleType:
    """The installed ``cggr_compile`` with its graph passes; exits saying what to run when they cannot
    be imported, or when they come from two different checkouts (an install of another one)."""
    try:
        import cggr_compile
        import cggr_compile.passes as passes
    except ModuleNotFoundError as err:
        if err.name not in ("cggr_compile", "cggr_compile.passes"):
            raise
        raise SystemExit(f"cannot import {err.name}: the benchmarks run the installed package. In the "
                         f"repository root run `{INSTALL_COMMAND}` (add --no-build-isolation on a machine "
                         "without network), then run the benchmark again") from None
    package = Path(cggr_compile.__file__).resolve().parent
    found = Path(passes.__file__).resolve().parent
    if found not in (package / "passes", package.parent / "passes"):
        raise SystemExit(f"cggr_compile is imported from {package} but cggr_compile.passes from {found} "
                         f"(another checkout's install); run `{INSTALL_COMMAND}` in {package.parent}")
    return cggr_compile


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its core and thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    return f"cpu ({proc}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """``nvidia-h200``, ``cpu``...: the device part of a results file's name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def percentiles_ms(times_ms: list[float]) -> dict[str, float]:
    """Median, 20th and 80th percentile (nearest rank below) of a list of times in ms."""
    ts = sorted(times_ms)
    return {"median_ms": statistics.median(ts), "p20_ms": ts[int(0.2 * (len(ts) - 1))],
            "p80_ms": ts[int(0.8 * (len(ts) - 1))]}


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak CUDA memory one call of ``fn`` allocates above what is allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)
