"""Helpers shared by the benchmark scripts: how a device is named in results and file names."""

from __future__ import annotations

import os
import platform
import re

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
