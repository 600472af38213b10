"""The benchmark scripts' shared harness, so that each script reads as its experiment: the library
import, the device and its names, Llama models from shape dicts, timing and its summaries, run
metadata and the result files."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent

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


def pick_device(name: Optional[str] = None) -> torch.device:
    """``--device``, by default cuda when there is one, else the CPU; a CUDA device gets its index and
    becomes the current one (``set_device`` and the memory statistics want an index)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def log(msg: str) -> None:
    """A progress line, flushed at once (a run's log is read while it runs)."""
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ------------------------------------------------------------------------------------------- models
# Llama shapes by name (speed.py, ddp_speed.py). head_dim = hidden / heads = 64 for the three real ones.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                       tied=True, batch=16, seq=1024),
    "smollm360m": dict(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49152,
                       tied=True, batch=16, seq=1024),
    "llama1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                    tied=True, batch=8, seq=1024),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256,
                 tied=True, batch=8, seq=32),
}


def llama_config(shape: dict[str, Any], layers: Optional[int] = None, **overrides: Any) -> Any:
    """The ``LlamaConfig`` of a shape dict (hidden, layers, heads, kv_heads, intermediate, vocab, tied,
    seq: the longest sequence it must embed); ``layers`` replaces the shape's depth, ``overrides`` go to
    ``LlamaConfig`` as they are."""
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers or shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(2048, shape["seq"]),
        tie_word_embeddings=shape["tied"],
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_llama(shape: dict[str, Any], device: torch.device, layers: Optional[int] = None) -> torch.nn.Module:
    """A randomly initialised Llama of ``shape`` on ``device``, seeded 0, SDPA attention, no KV cache,
    in train mode."""
    from transformers import AutoModelForCausalLM

    cfg = llama_config(shape, layers, use_cache=False)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(0)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    except Exception:  # noqa: BLE001 - some versions refuse a device context: build on CPU, move
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    model.train()
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise RuntimeError(f"attention implementation is {impl!r}, expected 'sdpa'")
    return model


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The timed step's optimizer: AdamW (lr 3e-4, betas 0.9 / 0.95, weight decay 0.1), fused on CUDA."""
    kw: dict[str, Any] = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(model.parameters(), **kw)


def random_batches(shape: dict[str, Any], batch: int, seq: int, device: torch.device, n: int = 4) -> list[dict]:
    """``n`` seeded batches of random token ids (never zeros), their labels the ids, no padding."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(0, shape["vocab"], (batch, seq), generator=g).to(device)
        out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone()))
    return out


def rows_for(ratio: float, batch: int) -> int:
    """``k = clamp(ceil(ratio * B), 1, B)`` (SPEC.md), the library's own rounding when importable."""
    try:
        from cggr_compile.schedule import rows_for_ratio

        return rows_for_ratio(ratio, batch)
    except Exception:  # noqa: BLE001
        return max(1, min(batch, math.ceil(ratio * batch - 1e-9)))


# ------------------------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[int], Any], n: int, device: torch.device,
               sync_each: bool = False) -> tuple[list[float], Any]:
    """Milliseconds of each of ``fn(0) .. fn(n - 1)`` and the last result. On CUDA by events around
    each call and one synchronisation at the end, so the queue stays full and each time is the
    device's (``sync_each``: a synchronisation after every call, so that none overlaps the next's
    launch); on the CPU by ``perf_counter``."""
    last = None
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (start, end) in enumerate(events):
            start.record()
            last = fn(i)
            end.record()
            if sync_each:
                torch.cuda.synchronize(device)
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events], last
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        last = fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, last


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linearly interpolated between ranks; NaN when empty."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def profile_steps(step: Callable[[dict], Any], batches: list[dict], device: torch.device,
                  steps: int = 3) -> dict[str, Any]:
    """Where a step's time goes: host time to enqueue it, device time in kernels, kernel count, top kernels.

    ``host_ms`` ~ ``wall_ms`` with ``gpu_busy_ms`` well below it means the step is bound by the host
    (launch overhead: CUDA graphs help); ``gpu_busy_ms`` ~ ``wall_ms`` means the kernels themselves.
    """
    if device.type != "cuda":
        return {"note": "n/a on cpu"}
    from torch.profiler import ProfilerActivity, profile

    host, wall = [], []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            sync(device)
            t0 = time.perf_counter()
            step(batches[i % len(batches)])
            host.append((time.perf_counter() - t0) * 1e3)
            sync(device)
            wall.append((time.perf_counter() - t0) * 1e3)
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        # user annotations (Optimizer.step#..., DDP's forward, nccl:all_reduce) span kernels: not kernels
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False) \
                and not e.name.startswith(("Optimizer.", "DistributedDataParallel.", "nccl:")):
            kernels.setdefault(e.name, []).append(e.device_time_total / 1e3 if hasattr(e, "device_time_total")
                                                  else e.cuda_time_total / 1e3)
    busy = sum(sum(v) for v in kernels.values()) / steps
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:15]
    return dict(steps=steps, host_ms=statistics.median(host), wall_ms=statistics.median(wall), gpu_busy_ms=busy,
                kernels_per_step=sum(len(v) for v in kernels.values()) / steps,
                top_kernels=[dict(name=n[:120], ms_per_step=sum(v) / steps, calls_per_step=len(v) / steps)
                             for n, v in top])


# ----------------------------------------------------------------------------------------- metadata
def versions() -> dict[str, Any]:
    """Python, torch, CUDA, triton, transformers and cggr-compile versions, the files the library was
    imported from, and the checkout's commit (with whether the library's files differ from it)."""
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda}
    for pkg in ("triton", "pytorch-triton", "transformers", "cggr-compile"):
        try:
            out[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001
            pass
    try:
        import triton

        out["triton_module"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import cggr_compile
        import cggr_compile.passes

        out["cggr_compile_file"] = cggr_compile.__file__
        out["cggr_passes_file"] = cggr_compile.passes.__file__
    except Exception as err:  # noqa: BLE001
        out["cggr_import_error"] = repr(err)
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cggr_compile", "passes"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["library_dirty"] = bool(dirty)
    except Exception:  # noqa: BLE001
        pass
    return out


def command_line(script: str, argv: Optional[list[str]] = None) -> str:
    """``python benchmarks/<script> ARGS``, runnable from the repository root (ARGS: ``argv``, by
    default this process's)."""
    return shlex.join(["python", f"benchmarks/{script}"] + (sys.argv[1:] if argv is None else list(argv)))


# ------------------------------------------------------------------------------------------ reports
def result_stem(kind: str, name: Optional[str], slug: str) -> str:
    """A result file's name without its suffix: ``<kind>_<name>_<device slug>`` (no name: ``<kind>_<slug>``)."""
    return "_".join(part for part in (kind, name, slug) if part)


def write_json(path: Path, data: Any) -> Path:
    """``data`` as indented JSON (what JSON cannot hold as its ``str``); the folder is made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def write_report(out_dir: Path, stem: str, data: Any, markdown: Optional[str] = None) -> list[Path]:
    """``<stem>.json`` and, given its text, ``<stem>.md`` under ``out_dir``; returns the paths."""
    paths = [write_json(out_dir / f"{stem}.json", data)]
    if markdown is not None:
        paths.append(out_dir / f"{stem}.md")
        paths[-1].write_text(markdown)
    return paths


def copy_to_out(paths: Iterable[Path], out_dir: Path) -> None:
    """Copies ``paths`` into ``$OUT`` when that is set and not ``out_dir``: the lent GPU machine returns
    only ``$OUT``. Best effort: a failed copy leaves the results where they were written."""
    extra = os.environ.get("OUT")
    if not extra or Path(extra).resolve() == out_dir.resolve():
        return
    try:
        Path(extra).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, Path(extra) / p.name)
    except OSError:
        pass


# ---------------------------------------------------------------------------- step timing options
def step_timing_options(p: argparse.ArgumentParser, device_help: str, cudagraphs_help: str, merge_help: str) -> None:
    """The options speed.py and ddp_speed.py share: what is timed (``--steps``, ``--warmup``, ``--batch``,
    ``--seq``), where (``--device``, ``--cudagraphs``, ``--profile``) and what is written (``--out-dir``,
    ``--name``, ``--merge``). Defaults ``None`` are filled from each script's preset."""
    p.add_argument("--steps", type=int, help="timed steps per mode")
    p.add_argument("--warmup", type=int, help="warm-up steps per mode (the first one is the cold compile)")
    p.add_argument("--batch", type=int, help="override the shape's batch size (ddp_speed: rows per rank)")
    p.add_argument("--seq", type=int, help="override the shape's sequence length")
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument("--cudagraphs", action="store_true", help=cudagraphs_help)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 steps per mode (common.profile_steps): host time, kernel time, "
                        "kernel count, top kernels")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="output name (default: the preset's)")
    p.add_argument("--merge", nargs="+", default=None, help=merge_help)


# ---------------------------------------------------------------------------- kernel benchmarks
# bench_fused_loss.py and bench_fused_scorer.py: a grid of (tokens, head) cases, one column per path.
def kernel_bench_parser(doc: str, small_flag: str, small_help: str, tokens: tuple[int, ...],
                        reps_help: str, kind: str) -> argparse.ArgumentParser:
    """The flags both kernel benchmarks take: ``--<small_flag>`` (tiny shapes on any device),
    ``--tokens``, ``--device``, ``--reps`` and ``--out``; each script adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(f"--{small_flag}", action="store_true", help=small_help)
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help=f"token counts (default {' '.join(map(str, tokens))})")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--reps", type=int, default=None, help=reps_help)
    ap.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/{kind}_<device slug>.json)")
    return ap


def kernel_bench_device(ap: argparse.ArgumentParser, name: Optional[str], small: bool, small_flag: str) -> torch.device:
    """``--device``; the full grid needs CUDA (its shapes take minutes on a CPU)."""
    device = pick_device(name)
    if device.type != "cuda" and not small:
        ap.error(f"the full benchmark needs CUDA; use --{small_flag} on the CPU")
    return device


def kernel_bench_report(kind: str, device: torch.device, script: str, argv: Optional[list[str]],
                        **fields: Any) -> dict[str, Any]:
    """The result's header (benchmark, device, versions, command) followed by ``fields``."""
    return dict(benchmark=kind, device=device_name(device), device_type=device.type, torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                command=command_line(script, argv), **fields)


def kernel_bench_out(out: Optional[str], kind: str, device: torch.device, suffix: str) -> Path:
    """``--out``, by default ``benchmarks/results/<kind>_<device slug><suffix>.json``."""
    return Path(out) if out else REPO / "benchmarks" / "results" / f"{result_stem(kind, None, device_slug(device))}{suffix}.json"


def print_path_table(cases: list[dict], names: list[str], keys: dict[str, int], units: str, width: int,
                     cell: Callable[[dict], str]) -> None:
    """The last printout: one row per case (its ``keys``, right-aligned to their widths), one column per
    path, ``cell(result)`` or the path's error."""
    def lead(values: Iterable[Any]) -> str:
        return " ".join(f"{v:>{w}}" for v, w in zip(values, keys.values())) + " | "

    print()
    print(lead(keys) + " | ".join(f"{n:>{width}}" for n in names))
    print(lead([""] * len(keys)) + " | ".join(units for _ in names))
    for c in cases:
        cells = []
        for n in names:
            r = c["paths"].get(n, {"error": "not run"})
            cells.append(f"{'ERR ' + r['error'][:width - 4]:>{width}}" if "error" in r else cell(r))
        print(lead(c[k] for k in keys) + " | ".join(cells))
