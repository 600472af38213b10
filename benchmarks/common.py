"""Helpers shared by the benchmark scripts: how a device is named in results and file names."""

from __future__ import annotations

import os
import platform
import re
import statistics
from typing import Callable, Optional

import torch


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
