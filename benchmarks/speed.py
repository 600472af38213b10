"""Canonical side-by-side speed benchmark: one command, one process, every mode on the same model.

    python benchmarks/speed.py                       # 3 shapes, ratio 0.25, router 4 (one H100 / H200)
    python benchmarks/speed.py --preset tiny         # CPU check of the script (< 60 s), not figures
    python benchmarks/speed.py --models smollm135m --ratios 0.1 0.25 0.5 --router-layers 2 4
    python benchmarks/speed.py --merge a.json b.json # one table from several runs' JSON

Modes (each on a freshly built, randomly initialised model from a config, seeded identically;
``model.config.use_cache = False``, SDPA attention, bf16 autocast on CUDA, fused AdamW on CUDA whose
``step()`` is inside the timed step; ``zero_grad(set_to_none=True)``):

* ``eager``: the standard step on the whole batch (B rows).
* ``compiled``: ``torch.compile(model)`` (Inductor), standard step on the whole batch.
* ``compiled_fused_loss`` (with ``--fused-loss``): ``compiled`` with the model's loss computed by the
  fused head + cross-entropy (``cggr_compile.ops.fused_linear_ce``, no ``B x T x V`` logits): what the
  fusion alone buys. ``--fused-loss`` also runs ``random_subset`` and the CGGR modes
  (``fused_loss=True``) with the fused loss; their records say ``fused_loss: true``.
* ``random_subset``: ``torch.compile(model)`` run on ``k = clamp(ceil(ratio * B), 1, B)`` rows picked by
  ``index_select`` with a device ``randperm``: the ceiling of a sequence-level CGGR without a router.
* ``router_only``: the router alone: ``torch.compile`` of ``cg.sequence_difficulty`` (K layers + norm +
  the learned exit, or lm_head + scoring for the head-based scorings) followed by ``topk(k)``, under ``torch.no_grad()``; no backward, no optimizer.
* ``cggr_backend``: ``torch.compile(model, backend="cggr", options=...)``; ``cggr_compile.step(model)``.
* ``cggr_transform``: ``torch.compile(cggr_compile.transform(model, ...))``; ``cg.step()``.
  Both CGGR modes use ``warmup_steps=0, dynamic_threshold=False`` and otherwise the library's defaults
  (the learned exit, no vocabulary head in the router, and truncation; ``--scoring`` to change the
  scoring), so that every timed step trains exactly ``k`` rows, like ``random_subset``.

Figures per mode (JSON has them all, the markdown table the main ones):

* step time: median (and p10 / p90) over ``--steps`` steps after ``--warmup`` warm-up steps, by CUDA
  events around each step (host ``perf_counter`` on the CPU); also the mean by wall clock over the
  timed loop, as a cross-check. Batches rotate over 4 pre-generated random batches (never zeros).
* tokens/s: ``B * T / step`` (the user's throughput over the *full* batch, also for subset modes).
* peak memory: ``torch.cuda.max_memory_allocated()`` over the timed steps (reset after warm-up).
* cold compile: wall time of the first step (device synchronised). The script sets
  ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` before importing torch (unless ``--keep-caches``), so no
  FX-graph / AOT / autotune cache from an earlier run or an earlier mode can make it look cheap.
  Each mode also runs inside ``torch._inductor.utils.fresh_cache()`` (an empty Inductor / Triton cache
  directory, in-memory kernel tables cleared), so no mode reuses the kernels of an earlier one.
  For ``eager`` it is the first step's time (allocator and cuBLAS warm-up).
* compilations: during the mode, the deltas of ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``
  (graphs Dynamo captured, one per graph break and per recompilation) and
  ``counters["aot_autograd"]["total"]`` (AOTAutograd / Inductor compilations, CUDA only for the cggr
  backend: on the CPU it runs its graph with eager ops), and for ``cggr_backend`` the number of
  routed graphs the backend compiled (sizes of every live ``RoutedGraph.compiled`` dict of this
  model, found with ``gc``).
* schedule compilations (``--schedule``): for the two CGGR modes, a fresh model with
  ``warmup_steps=--schedule-warmup`` (8) runs ``--schedule-steps`` (12) steps calling ``step()`` after
  each; the same counters are reported, with the ``k`` of every step (from the CGGR metrics) and
  every step's wall time. By default it runs once (``first`` shape) on a shallower copy of that
  shape (``--schedule-layers``, default router_layers + 2): the count depends on B, the ratio
  levels and the schedule, not on depth, and 8 cold compiles of a 30-layer model would not fit
  the time budget. ``--schedule-layers 0`` keeps the full depth.
* host synchronisation: one more step under ``torch.cuda.set_sync_debug_mode("error")`` (reset to
  0 afterwards); ``syncs: false`` when it ran through, else the error message.
* speedup over ``compiled`` (``compiled_ms / mode_ms``) and the gap of each CGGR mode to
  ``random_subset + router_only`` (the best a sequence-level CGGR step can do).

Before measuring, the script measures the device's two ceilings (a bf16 matmul and a device-to-device
copy) and prints, per shape, the predicted FLOPs (``6 * params * tokens`` for forward + backward of
the trained rows, attention and the lm_head counted separately, ``2 * router params * B * T`` for
the router) and the bytes the optimizer must move, with the floor time they imply.

Each mode runs inside try/except: a failure records its error and the rest still run. A mode whose
CGGR metrics are missing or whose ``k`` differs from the expected one is marked ``not_routed``.
``--time-budget`` skips (and records) the modes that would not fit; JSON and markdown are rewritten
after every mode, so a run cut short keeps what it measured.

Outputs: ``benchmarks/results/speed_<name>_<device-slug>.{json,md,png}`` (``--out-dir``), copied to
``$OUT`` too when that variable is set (the lent GPU machine returns only ``$OUT``). ``<name>`` is
the preset, or ``--name``. The markdown table is printed last.

Run it from the repository root of an installed checkout: ``python -m pip install --no-deps -e .``
(with ``--no-build-isolation`` on a machine without network, such as one that gets the code as an
unpacked tarball); the script imports the installed ``cggr_compile`` and says so when it cannot.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--keep-caches" not in sys.argv:
    # Honest cold-compile times: no Inductor / AOTAutograd / FX-graph cache may serve a compile.
    # Must be set before torch is imported.
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for ``benchmarks.*``; cggr_compile must be installed (require_cggr_compile)

import torch  # noqa: E402

from benchmarks.common import (SHAPES, adamw, build_llama, command_line, copy_to_out, device_name,  # noqa: E402
                               device_slug, llama_config, log, percentile, pick_device, profile_steps,
                               random_batches, require_cggr_compile, result_stem, rows_for, sync, time_calls,
                               versions, write_report)

ALL_MODES = ("eager", "compiled", "compiled_fused_loss", "random_subset", "router_only", "cggr_backend",
             "cggr_transform")
# compiled_fused_loss runs by default only with --fused-loss (the other modes always)
DEFAULT_MODES = tuple(m for m in ALL_MODES if m != "compiled_fused_loss")
FULL_BATCH_MODES = ("eager", "compiled", "compiled_fused_loss")
CGGR_MODES = ("cggr_backend", "cggr_transform")
COMPILED_MODES = ("compiled", "random_subset", "router_only", "cggr_transform")

# Every key can be overridden on the command line.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(models=["smollm135m", "smollm360m", "llama1b"], ratios=[0.25], router_layers=[4],
                steps=20, warmup=10, schedule="first", schedule_warmup=8, schedule_steps=12,
                time_budget=480.0),
    # The CPU check of the script: a shorter schedule (warmup 2: k = 8, 6, 2, 2) keeps it under a minute.
    "tiny": dict(models=["tiny"], ratios=[0.25], router_layers=[1], steps=5, warmup=2,
                 schedule="first", schedule_warmup=2, schedule_steps=4, time_budget=0.0, threads=1),
}

# FINDINGS.md, "The numbers to beat" (H200, torch 2.11, ratio 0.25, router 4): median ms.
REFERENCE_H200 = {
    "smollm135m": dict(eager=113.5, compiled=61.6, random_subset=27.1, original_cggr=66.6, router_only=6.0),
    "smollm360m": dict(eager=195.5, compiled=116.7, random_subset=39.4, original_cggr=79.8, router_only=8.8),
    "llama1b": dict(eager=178.8, compiled=134.3, random_subset=46.5, original_cggr=84.3, router_only=18.8),
}


# ------------------------------------------------------------------------------------------ helpers
def free_memory(device: torch.device) -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class LogCapture(logging.Handler):
    """Collects torch._dynamo / torch._inductor warnings (recompile limit, graph-break fallbacks)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            msg = str(record.msg)
        if len(self.messages) < 20:
            self.messages.append(f"{record.name}: {msg[:400]}")


def counter_snapshot() -> dict[str, int]:
    c = torch._dynamo.utils.counters
    return {
        "unique_graphs": int(c["stats"].get("unique_graphs", 0)),
        "aot_autograd_compiles": int(c["aot_autograd"].get("total", 0)),
        "graph_breaks": int(sum(c["graph_break"].values())),
    }


def counter_delta(before: dict[str, int]) -> dict[str, int]:
    now = counter_snapshot()
    return {k: now[k] - before.get(k, 0) for k in now}


def routed_graph_compiles(model: torch.nn.Module) -> Optional[int]:
    """Sum of ``len(RoutedGraph.compiled)`` over the cggr backend's live graphs for ``model``."""
    try:
        from cggr_compile.backend import RoutedGraph
    except Exception:  # noqa: BLE001
        return None
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, RoutedGraph) and getattr(obj.core, "model", None) is model:
                total += len(obj.compiled)
        except Exception:  # noqa: BLE001
            continue
    return total


def fresh_caches(args: argparse.Namespace) -> Any:
    """A fresh, empty Inductor + Triton cache directory and cleared in-memory kernel caches for one mode.

    ``TORCHINDUCTOR_FORCE_DISABLE_CACHES`` turns off the FX-graph / AOTAutograd / autotune caches, but
    not Triton's on-disk kernel cache nor Inductor's in-process table of compiled kernels: without
    this, a later mode would reuse the kernels an earlier mode compiled and its cold compile would
    look cheaper than a user's first run.
    """
    if args.keep_caches:
        return contextlib.nullcontext()
    try:
        import torch._inductor.utils as iu

        fn = getattr(iu, "fresh_cache", None) or getattr(iu, "fresh_inductor_cache", None)
        if fn is not None:
            return fn()
    except Exception:  # noqa: BLE001
        pass
    return contextlib.nullcontext()


class RunCapture:
    """While one run is active: the torch._dynamo / torch._inductor log warnings, the Python warnings,
    and a weak reference to the run's model, to check after the run that nothing keeps it (and its
    memory) alive."""

    LOGGERS = ("torch._dynamo", "torch._inductor")

    def __init__(self) -> None:
        self.log = LogCapture()
        self._catch = warnings.catch_warnings(record=True)
        self._caught: list[warnings.WarningMessage] = []
        self._model: Optional[Callable[[], Optional[torch.nn.Module]]] = None

    def __enter__(self) -> "RunCapture":
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self.log)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._catch.__exit__(*exc)
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self.log)

    def warnings(self) -> list[str]:
        return sorted({str(w.message)[:400] for w in self._caught})[:10]

    def track(self, model: torch.nn.Module) -> None:
        import weakref

        self._model = weakref.ref(model)

    def model_freed(self) -> bool:
        return self._model is None or self._model() is None


def run_isolated(rec: dict[str, Any], device: torch.device, wall_key: str,
                 body: Callable[[RunCapture], None]) -> dict[str, Any]:
    """``body(capture)`` on a freed device, recorded into ``rec`` instead of raised: its error and
    traceback (status ``error``, or ``skipped`` for an error that starts so), the log warnings, whether
    its model was freed after it and its wall time (``rec[wall_key]``). ``body`` holds the model in
    its own locals only (gone when it returns) and registers it with ``capture.track``."""
    capture = RunCapture()
    free_memory(device)
    t0 = time.perf_counter()
    try:
        with capture:
            body(capture)
    except Exception as err:  # noqa: BLE001 - a failing mode records its error; the others still run
        rec["status"] = "skipped" if str(err).startswith("skipped") else "error"
        rec["error"] = f"{type(err).__name__}: {str(err)[:1000]}"
        rec["traceback"] = traceback.format_exc()[-3000:]
        if device.type == "cuda":  # a failure inside sync_check leaves the debug mode on
            with contextlib.suppress(Exception):
                torch.cuda.set_sync_debug_mode(0)
    finally:
        rec["log_warnings"] = capture.log.messages
        free_memory(device)
        rec["model_freed"] = capture.model_freed()
        rec[wall_key] = time.perf_counter() - t0
    return rec


# ---------------------------------------------------------------------------------------- the model
def param_counts(shape: dict[str, Any], router_layers: int) -> dict[str, int]:
    """Exact parameter counts from a meta-device model (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(llama_config(shape, use_cache=False), attn_implementation="sdpa")
    emb = m.get_input_embeddings().weight.numel()
    head = m.get_output_embeddings().weight
    total = sum(p.numel() for p in m.parameters())  # tied: counted once
    layers = m.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    norm = sum(p.numel() for p in m.model.norm.parameters())
    return dict(total=total, embedding=emb, lm_head=head.numel(), tied=int(head is m.get_input_embeddings().weight),
                per_layer=per_layer, body=per_layer * len(layers) + norm,
                router_body=per_layer * router_layers + norm)


def predict(shape: dict[str, Any], batch: int, seq: int, k: int, router_layers: int,
            ceilings: dict[str, float]) -> dict[str, Any]:
    """FLOPs and bytes a step must do at least; embedding gather and norms' FLOPs are ignored."""
    pc = param_counts(shape, router_layers)
    h, v, n_layers = shape["hidden"], shape["vocab"], shape["layers"]

    def fwd_per_token(body: int, layers: int) -> dict[str, float]:
        return dict(body=2.0 * body, lm_head=2.0 * h * v, attention=2.0 * seq * h * layers)  # causal: half of 4*T*H

    def train(rows: int) -> dict[str, float]:
        f = fwd_per_token(pc["body"], n_layers)
        return {key: 3.0 * val * rows * seq for key, val in f.items()}  # forward + backward = 3 x forward

    full = train(batch)
    sub = train(k)
    r = fwd_per_token(pc["router_body"], router_layers)
    router = {key: val * batch * seq for key, val in r.items()}  # forward only, no grad
    opt_bytes = 28.0 * pc["total"]  # AdamW fp32: read p, g, m, v; write p, m, v
    # lm_head logits in bf16: written + read once forward, grad written + read once backward.
    logits_bytes = lambda rows: 4 * 2.0 * rows * seq * v  # noqa: E731
    out: dict[str, Any] = dict(params=pc, k=k)
    for name, flops, nbytes in (
        ("full", full, opt_bytes + logits_bytes(batch)),
        ("random_subset", sub, opt_bytes + logits_bytes(k)),
        ("router_only", router, 2.0 * batch * seq * v),
        ("cggr", {key: sub[key] + router[key] for key in sub}, opt_bytes + logits_bytes(k) + 2.0 * batch * seq * v),
    ):
        total = sum(flops.values())
        entry: dict[str, Any] = dict(flops=flops, flops_total=total, bytes_min=nbytes)
        if ceilings.get("matmul_tflops"):
            t_flops = total / (ceilings["matmul_tflops"] * 1e12) * 1e3
            t_bytes = nbytes / (ceilings["copy_gbps"] * 1e9) * 1e3
            entry.update(floor_ms_flops=t_flops, floor_ms_bytes=t_bytes, floor_ms=max(t_flops, t_bytes))
        out[name] = entry
    return out


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """bf16 matmul rate and device-to-device copy bandwidth, measured once (METHOD.md)."""
    if device.type != "cuda":
        return {}
    out: dict[str, float] = {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times, _ = time_calls(lambda _, a=a, b=b: a @ b, 10, device, sync_each=True)
    out["matmul_tflops"] = 2.0 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12
    del a, b
    numel = (1 << 30) // 4
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times, _ = time_calls(lambda _, x=x, y=y: y.copy_(x), 10, device, sync_each=True)
    out["copy_gbps"] = 2.0 * numel * 4 / (statistics.median(times) * 1e-3) / 1e9
    del x, y
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------- the modes
class Ctx:
    """Everything a mode needs that is not the model."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"

    def autocast(self):
        if self.cuda and not self.args.no_autocast:
            return torch.autocast("cuda", torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def compile(self, fn: Any) -> Any:
        if self.args.no_compile:
            return fn
        backend = self.args.compile_backend or ("inductor" if self.cuda else "eager")
        if self.cudagraphs and backend == "inductor":
            return torch.compile(fn, backend=backend, mode="reduce-overhead")
        return torch.compile(fn, backend=backend)

    @property
    def cudagraphs(self) -> bool:
        return self.cuda and self.args.cudagraphs

    def cggr_options(self, ratio: float, router_layers: int, warmup_steps: int = 0) -> dict[str, Any]:
        opts = dict(min_tokens_ratio=ratio, router_layers=router_layers, warmup_steps=warmup_steps,
                    dynamic_threshold=False)
        if self.args.scoring is not None:  # else the library's default
            opts["scoring"] = self.args.scoring
        if self.args.fused_loss:
            opts["fused_loss"] = True
        if self.cudagraphs:
            opts["cudagraphs"] = True
        return opts


def fused_loss_full_batch(model: torch.nn.Module) -> Callable[..., Any]:
    """``--fused-loss``: the whole batch with the fused head + cross-entropy instead of the model's
    own loss (``cggr_compile.ops.fused_linear_ce``): its base model, then the loss over every shifted
    label that is not -100 (the Hugging Face causal LM loss, the same mean), with no B x T x V
    logits. What the fusion alone buys, without CGGR."""
    from cggr_compile.passes.fuse_loss import choose_fused_loss, fused_main_pass, selective_loss
    from cggr_compile.scoring import IGNORE_INDEX, aligned_labels
    from cggr_compile.transform import CGGROutput

    choice = choose_fused_loss(model, True, strict=True)

    def fwd(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
            labels: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        out = fused_main_pass(choice, input_ids, attention_mask, kwargs, CGGROutput)
        target = aligned_labels(labels, causal=True)
        out["loss"] = selective_loss(choice, out, target, target != IGNORE_INDEX)
        return out
    return fwd


def setup_mode(mode: str, model: torch.nn.Module, opt: torch.optim.Optimizer, ctx: Ctx, batch: int, k: int,
               ratio: float, router_layers: int, warmup_steps: int = 0) -> tuple[Callable[[dict], Any], Callable[[], dict]]:
    """Returns ``step(batch_dict) -> tensor`` (one whole timed step) and ``info() -> dict`` (routing check)."""
    import cggr_compile

    def train_step(fwd: Callable[..., Any], after: Callable[[], None] = lambda: None) -> Callable[[dict], Any]:
        def step(b: dict) -> Any:
            with ctx.autocast():
                out = fwd(**b)
            loss = out.loss if hasattr(out, "loss") else out["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            after()
            return loss.detach()
        return step

    no_info: Callable[[], dict] = lambda: {}  # noqa: E731
    if mode == "eager":
        return train_step(model), no_info
    if mode == "compiled":
        return train_step(ctx.compile(model)), no_info
    if mode == "compiled_fused_loss":
        return train_step(ctx.compile(fused_loss_full_batch(model))), no_info
    if mode == "random_subset":
        cm = ctx.compile(fused_loss_full_batch(model) if ctx.args.fused_loss else model)

        def fwd(**b: Any) -> Any:
            idx = torch.randperm(batch, device=ctx.device)[:k]
            return cm(**{n: v.index_select(0, idx) for n, v in b.items()})
        return train_step(fwd), no_info
    if mode == "router_only":
        cg = cggr_compile.transform(model, **{k: v for k, v in ctx.cggr_options(ratio, router_layers).items()
                                              if k != "cudagraphs"})

        def select(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            d = cg.sequence_difficulty(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return torch.topk(d, k).indices

        fn = ctx.compile(select)

        def step(b: dict) -> Any:
            with torch.no_grad(), ctx.autocast():
                return fn(b["input_ids"], b["attention_mask"], b["labels"])
        return step, lambda: {"k_observed": k}
    if mode == "cggr_backend":
        if ctx.args.no_compile:
            raise RuntimeError("skipped: cggr_backend needs torch.compile (--no-compile given)")
        cm = torch.compile(model, backend="cggr", options=ctx.cggr_options(ratio, router_layers, warmup_steps))

        def info() -> dict:
            m = cggr_compile.last_metrics(model)
            sel = m.get("selected_indices")
            return {"k_observed": m.get("k"), "selected_rows": int(sel.shape[0]) if isinstance(sel, torch.Tensor) else None,
                    "routed_graph_compiles": routed_graph_compiles(model)}
        return train_step(cm, lambda: cggr_compile.step(model)), info
    if mode == "cggr_transform":
        cg = cggr_compile.transform(model, **{k: v for k, v in ctx.cggr_options(ratio, router_layers, warmup_steps).items()
                                              if k != "cudagraphs"})
        ccg = ctx.compile(cg)

        def info() -> dict:
            m = cg.metrics()
            return {"k_observed": m.get("k")}
        return train_step(ccg, cg.step), info
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(ALL_MODES)}")


def time_steps(step: Callable[[dict], Any], batches: list[dict], ctx: Ctx, warmup: int, steps: int) -> dict[str, Any]:
    dev = ctx.device
    res: dict[str, Any] = {}
    warm = []
    for i in range(max(1, warmup)):
        sync(dev)
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        sync(dev)
        warm.append(time.perf_counter() - t0)
    res["cold_compile_s"] = warm[0]
    res["warmup_step_s"] = warm
    if ctx.cuda:
        res["mem_before_timed_gib"] = torch.cuda.memory_allocated(dev) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    wall0 = time.perf_counter()
    times, last = time_calls(lambda i: step(batches[i % len(batches)]), steps, dev)
    wall = time.perf_counter() - wall0
    res["step_ms"] = times
    res["median_ms"] = statistics.median(times)
    res["p10_ms"] = percentile(times, 0.1)
    res["p90_ms"] = percentile(times, 0.9)
    res["wall_mean_ms"] = wall / steps * 1e3
    if ctx.cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    if isinstance(last, torch.Tensor) and last.is_floating_point() and last.numel() == 1:
        res["last_loss"] = float(last)
    return res


def sync_check(step: Callable[[dict], Any], batch: dict, ctx: Ctx, opt: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """One step under ``set_sync_debug_mode("error")``: does the step wait on the device?"""
    if not ctx.cuda:
        return {"syncs": None, "note": "n/a on cpu"}
    torch.cuda.synchronize()
    out: dict[str, Any]
    try:
        torch.cuda.set_sync_debug_mode("error")
        step(batch)
        out = {"syncs": False}
    except Exception as err:  # noqa: BLE001
        out = {"syncs": True, "error": f"{type(err).__name__}: {str(err)[:500]}",
               "where": traceback.format_exc()[-1500:]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    return out


def run_mode(mode: str, model_name: str, shape: dict[str, Any], ratio: float, router_layers: int,
             ctx: Ctx, batch: int, seq: int) -> dict[str, Any]:
    k = rows_for(ratio, batch)
    rec: dict[str, Any] = dict(mode=mode, model=model_name, batch=batch, seq=seq, ratio=ratio,
                               router_layers=router_layers, k=k, status="ok")
    if mode in FULL_BATCH_MODES:
        rec["ratio"], rec["router_layers"], rec["k"] = None, None, batch
    elif mode == "random_subset":
        rec["router_layers"] = None
    # the loss by the fused head + cross-entropy (cggr_compile.ops.fused_linear_ce)
    rec["fused_loss"] = mode == "compiled_fused_loss" or (
        bool(ctx.args.fused_loss) and mode in ("random_subset", "cggr_backend", "cggr_transform"))

    def measure(capture: RunCapture) -> None:
        if ctx.cuda:
            rec["mem_at_start_gib"] = torch.cuda.memory_allocated(ctx.device) / 2 ** 30
        before = counter_snapshot()
        model = build_llama(shape, ctx.device)
        capture.track(model)
        opt = adamw(model, ctx.device) if mode != "router_only" else None
        batches = random_batches(shape, batch, seq, ctx.device)
        step, info = setup_mode(mode, model, opt, ctx, batch, k, ratio, router_layers)
        rec.update(time_steps(step, batches, ctx, ctx.args.warmup, ctx.args.steps))
        rec["compile_counts"] = counter_delta(before)
        rec.update(info())
        rec["host_sync"] = sync_check(step, batches[0], ctx, opt)
        if ctx.args.profile:
            rec["profile"] = profile_steps(step, batches, ctx.device)
        rec["warnings"] = capture.warnings()
        rec["compiled_with"] = ("none" if ctx.args.no_compile else
                                "cggr" if mode == "cggr_backend" else
                                None if mode == "eager" else
                                (ctx.args.compile_backend or ("inductor" if ctx.cuda else "eager")))
        if mode in CGGR_MODES and rec.get("k_observed") != k:
            rec["status"] = "not_routed"
            cggr_warnings = [w for w in rec["warnings"] if "cggr" in w.lower()] or rec["warnings"]
            rec["error"] = (f"expected CGGR to train k={k} rows, its metrics say k={rec.get('k_observed')!r}; "
                            f"warnings: {cggr_warnings}")
        rec["tokens_per_s"] = batch * seq / (rec["median_ms"] * 1e-3)
        rec["trained_tokens_per_s"] = (0 if mode == "router_only" else rec["k"] * seq) / (rec["median_ms"] * 1e-3)

    return run_isolated(rec, ctx.device, "mode_wall_s", measure)


def run_schedule(mode: str, model_name: str, shape: dict[str, Any], ratio: float, router_layers: int,
                 ctx: Ctx, batch: int, seq: int) -> dict[str, Any]:
    """Compilations over a warmup curriculum: fresh model, warmup_steps=N, step() after every step."""
    a = ctx.args
    layers = a.schedule_layers if a.schedule_layers is not None else router_layers + 2
    layers = shape["layers"] if layers <= 0 else min(layers, shape["layers"])
    rec: dict[str, Any] = dict(mode=mode, model=model_name, layers=layers, batch=batch, seq=seq, ratio=ratio,
                               router_layers=router_layers, warmup_steps=a.schedule_warmup,
                               steps=a.schedule_steps, status="ok", fused_loss=bool(a.fused_loss))

    def measure(capture: RunCapture) -> None:
        before = counter_snapshot()
        model = build_llama(shape, ctx.device, layers=layers)
        capture.track(model)
        opt = adamw(model, ctx.device)
        batches = random_batches(shape, batch, seq, ctx.device)
        step, info = setup_mode(mode, model, opt, ctx, batch, rows_for(ratio, batch), ratio, router_layers,
                                warmup_steps=a.schedule_warmup)
        ks, walls = [], []
        for i in range(a.schedule_steps):
            sync(ctx.device)
            ts = time.perf_counter()
            step(batches[i % len(batches)])
            sync(ctx.device)
            walls.append(time.perf_counter() - ts)
            ks.append(info().get("k_observed"))
        rec["k_per_step"] = ks
        rec["step_wall_s"] = walls
        rec["distinct_k"] = len({x for x in ks if x is not None})
        rec["compile_counts"] = counter_delta(before)
        if mode == "cggr_backend":
            rec["routed_graph_compiles"] = routed_graph_compiles(model)
        rec["warnings"] = capture.warnings()
        hit_limit = [m for m in capture.log.messages if "recompile_limit" in m or "cache_size_limit" in m]
        rec["recompile_limit_hit"] = bool(hit_limit)
        if None in rec["k_per_step"]:
            rec["status"] = "not_routed"

    return run_isolated(rec, ctx.device, "wall_s", measure)


# ------------------------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".1f", dash: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return dash
    return format(x, spec)


def find(records: list[dict], mode: str, model: str, ratio: Optional[float] = None,
         router_layers: Optional[int] = None) -> Optional[dict]:
    for r in records:
        if r["mode"] != mode or r["model"] != model:
            continue
        if mode in ("random_subset", "cggr_backend", "cggr_transform") and r.get("ratio") != ratio:
            continue
        if mode in ("router_only", "cggr_backend", "cggr_transform") and r.get("router_layers") != router_layers:
            continue
        return r
    return None


def ok_ms(r: Optional[dict]) -> Optional[float]:
    if r is None or r.get("status") not in ("ok",) or "median_ms" not in r:
        return None
    return r["median_ms"]


def combos(records: list[dict]) -> list[tuple[str, float, int]]:
    seen: list[tuple[str, float, int]] = []
    for r in records:
        if r["mode"] in CGGR_MODES or r["mode"] == "router_only":
            c = (r["model"], r["ratio"], r["router_layers"])
            if c not in seen:
                seen.append(c)
    for r in records:  # shapes run without any CGGR mode
        if not any(c[0] == r["model"] for c in seen):
            c = (r["model"], r.get("ratio"), r.get("router_layers"))
            if c not in seen:
                seen.append(c)
    return seen


def derive(records: list[dict]) -> list[dict]:
    """Speedups over ``compiled`` and gaps of CGGR to random_subset + router_only, per combination."""
    out = []
    for model, ratio, rl in combos(records):
        comp = ok_ms(find(records, "compiled", model))
        rs = ok_ms(find(records, "random_subset", model, ratio))
        ro_rec = None
        for r in records:  # router_only is keyed by router layers; its ratio only sets topk's k
            if r["mode"] == "router_only" and r["model"] == model and r.get("router_layers") == rl:
                ro_rec = r
                break
        ro = ok_ms(ro_rec)
        ceiling = rs + ro if rs is not None and ro is not None else None
        row: dict[str, Any] = dict(model=model, ratio=ratio, router_layers=rl, compiled_ms=comp,
                                   random_subset_ms=rs, router_only_ms=ro, ceiling_ms=ceiling)
        for mode in ALL_MODES:
            r = find(records, mode, model, ratio, rl)
            ms = ok_ms(r)
            row[f"{mode}_ms"] = ms
            row[f"{mode}_speedup_vs_compiled"] = comp / ms if comp and ms else None
        for mode in CGGR_MODES:
            ms = row[f"{mode}_ms"]
            row[f"{mode}_gap_ms"] = ms - ceiling if ms is not None and ceiling is not None else None
            row[f"{mode}_over_ceiling"] = ms / ceiling if ms is not None and ceiling else None
        out.append(row)
    return out


def sync_cell(r: dict) -> str:
    hs = r.get("host_sync")
    if not hs:
        return "–"
    if hs.get("syncs") is None:
        return "n/a"
    if not hs["syncs"]:
        return "no"
    msg = hs.get("error", "")
    return "YES: " + msg.replace("|", "/").replace("\n", " ")[:80]


def compiles_cell(r: dict) -> str:
    c = r.get("compile_counts")
    if not c:
        return "–"
    s = f"{c['unique_graphs']}g/{c['aot_autograd_compiles']}a"
    if r.get("routed_graph_compiles") is not None:
        s += f"/{r['routed_graph_compiles']}r"
    if c.get("graph_breaks"):
        s += f" ({c['graph_breaks']} breaks)"
    return s


def markdown(meta: dict, records: list[dict], schedules: list[dict], predictions: list[dict]) -> str:
    L: list[str] = []
    L.append(f"# Speed: {meta.get('name')} on {meta.get('device_name')}")
    L.append("")
    v = meta.get("versions", {})
    L.append(f"torch {v.get('torch')}, triton {v.get('triton') or v.get('pytorch-triton') or v.get('triton_module')}, "
             f"transformers {v.get('transformers')}, python {v.get('python')}; commit {v.get('git_commit')}"
             f"{' (library modified)' if v.get('library_dirty') else ''}.")
    L.append(f"Command: `{meta.get('command')}`")
    s = meta.get("settings", {})
    L.append(f"Settings: {s.get('warmup')} warm-up + {s.get('steps')} timed steps per mode, "
             f"{'bf16 autocast' if s.get('autocast') else 'fp32, no autocast'}, SDPA, "
             f"{'fused ' if s.get('fused_adamw') else ''}AdamW inside the step, scoring {s.get('scoring')}, "
             f"compile backend {s.get('compile_backend')}"
             f"{' with CUDA graphs (reduce-overhead; cggr: cudagraphs=True)' if s.get('cudagraphs') else ''}, "
             f"TORCHINDUCTOR_FORCE_DISABLE_CACHES="
             f"{s.get('force_disable_caches')}.")
    if meta.get("ceilings"):
        c = meta["ceilings"]
        L.append(f"Measured ceilings: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, device copy {c['copy_gbps']:.0f} GB/s.")
    L.append("")
    L.append("Step = forward + backward + optimizer step, median over the timed steps (p10–p90), by CUDA events "
             "(perf_counter on CPU). tok/s = B·T / step (the full batch). Peak = max_memory_allocated over "
             "the timed steps. Cold = first step's wall time, caches disabled. Compiles = Dynamo graphs (g) / "
             "AOTAutograd compilations (a) / routed graphs compiled by the cggr backend (r) during the mode. "
             "Sync = does one step raise under `set_sync_debug_mode(\"error\")`.")
    L.append("")
    L.append("| model | B×T | ratio | router | k | mode | step ms (p10–p90) | tok/s | peak GiB | cold s | compiles | × compiled | sync | status |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        status = r.get("status", "?")
        if status != "ok":
            status += ": " + str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
        comp = ok_ms(find(records, "compiled", r["model"]))
        ms = ok_ms(r) if r["mode"] != "router_only" else None  # no training step: no speedup
        step = (f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}–{r['p90_ms']:.1f})" if "median_ms" in r else "–")
        L.append(
            f"| {r['model']} | {r['batch']}×{r['seq']} | {_fmt(r.get('ratio'), 'g')} | {_fmt(r.get('router_layers'), 'd')} "
            f"| {r.get('k')} | {r['mode']} | {step} | {_fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {_fmt(r.get('peak_mem_gib'), '.2f')} | {_fmt(r.get('cold_compile_s'), '.1f')} | {compiles_cell(r)} "
            f"| {_fmt(comp / ms if comp and ms else None, '.2f')} | {sync_cell(r)} | {status} |"
        )
    rows = derive(records)
    if rows:
        L.append("")
        L.append("Summary (median ms). Ceiling = random_subset + router_only: the best a sequence-level CGGR "
                 "step can do. Gap = CGGR − ceiling. × = speedup over compiled.")
        L.append("")
        L.append("| model | ratio | router | eager | compiled | random_subset | router_only | ceiling | cggr_backend | gap | × | cggr_transform | gap | × |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for d in rows:
            L.append(
                f"| {d['model']} | {_fmt(d['ratio'], 'g')} | {_fmt(d['router_layers'], 'd')} | {_fmt(d['eager_ms'])} "
                f"| {_fmt(d['compiled_ms'])} | {_fmt(d['random_subset_ms'])} | {_fmt(d['router_only_ms'])} "
                f"| {_fmt(d['ceiling_ms'])} | {_fmt(d['cggr_backend_ms'])} | {_fmt(d['cggr_backend_gap_ms'], '+.1f')} "
                f"| {_fmt(d['cggr_backend_speedup_vs_compiled'], '.2f')} | {_fmt(d['cggr_transform_ms'])} "
                f"| {_fmt(d['cggr_transform_gap_ms'], '+.1f')} | {_fmt(d['cggr_transform_speedup_vs_compiled'], '.2f')} |"
            )
    profiled = [r for r in records if "wall_ms" in (r.get("profile") or {})]
    if profiled:
        L.append("")
        L.append("Profile (`--profile`, 3 steps under torch.profiler, median): host = time to enqueue a step, "
                 "kernels = device time inside kernels (their sum), busy = kernels / wall. Host ≈ wall with "
                 "low busy means launch-bound.")
        L.append("")
        L.append("| model | mode | wall ms | host ms | kernels ms | busy | kernels/step | top kernels (ms/step) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in profiled:
            pr = r["profile"]
            top = "; ".join(f"{k['name'][:40].replace('|', '/')} {k['ms_per_step']:.2f}" for k in pr["top_kernels"][:4])
            L.append(f"| {r['model']} | {r['mode']} | {pr['wall_ms']:.1f} | {pr['host_ms']:.1f} | {pr['gpu_busy_ms']:.1f} "
                     f"| {pr['gpu_busy_ms'] / pr['wall_ms']:.0%} | {pr['kernels_per_step']:.0f} | {top} |")
    refs = [m for m in dict.fromkeys(r["model"] for r in records) if m in REFERENCE_H200]
    if refs:
        L.append("")
        L.append("Reference, FINDINGS.md (H200, torch 2.11, ratio 0.25, router 4; one run each), median ms:")
        L.append("")
        L.append("| model | eager | compiled | random_subset | router_only | original CGGR (eager) |")
        L.append("|---|---|---|---|---|---|")
        for m in refs:
            x = REFERENCE_H200[m]
            L.append(f"| {m} | {x['eager']} | {x['compiled']} | {x['random_subset']} | {x['router_only']} | {x['original_cggr']} |")
    if predictions:
        L.append("")
        L.append("Predicted work per step (before measuring): GFLOP = 6·params·tokens (+ attention, lm_head "
                 "separately) for the trained rows, 2·router params·B·T for the router; floor = max(FLOPs / "
                 "measured matmul rate, minimum bytes / measured copy bandwidth), bytes = AdamW's 28 B/param "
                 "+ bf16 logits.")
        L.append("")
        L.append("| model | ratio | router | params (body / emb) | full GFLOP | subset GFLOP | router GFLOP | CGGR GFLOP "
                 "| floor ms full / subset / router / CGGR | measured ms compiled / random_subset / router_only / cggr_backend |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        drows = derive(records)
        for p in predictions:
            pc = p["params"]
            floors = " / ".join(_fmt(p[n].get("floor_ms"), ".1f") for n in ("full", "random_subset", "router_only", "cggr"))
            d = next((x for x in drows if (x["model"], x["ratio"], x["router_layers"]) ==
                      (p["model"], p["ratio"], p["router_layers"])), {})
            measured = " / ".join(_fmt(d.get(f"{n}_ms")) for n in ("compiled", "random_subset", "router_only", "cggr_backend"))
            L.append(
                f"| {p['model']} | {_fmt(p['ratio'], 'g')} | {p['router_layers']} | {pc['body'] / 1e6:.1f}M / {pc['embedding'] / 1e6:.1f}M "
                f"| {p['full']['flops_total'] / 1e9:,.1f} | {p['random_subset']['flops_total'] / 1e9:,.1f} "
                f"| {p['router_only']['flops_total'] / 1e9:,.1f} | {p['cggr']['flops_total'] / 1e9:,.1f} | {floors} | {measured} |"
            )
    if schedules:
        L.append("")
        L.append("Compilations over a warmup schedule (fresh model, `warmup_steps` below, `step()` after every "
                 "step): k per step from the CGGR metrics; g = Dynamo unique graphs, a = AOTAutograd "
                 "compilations, r = routed graphs compiled by the backend (`RoutedGraph.compiled`).")
        L.append("")
        L.append("| mode | model (layers) | B | ratio | router | warmup | k per step | distinct k | compiles | limit hit | schedule wall s | status |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s_ in schedules:
            status = s_.get("status", "?")
            if status != "ok":
                status += ": " + str(s_.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
            ks = ",".join(str(x) for x in s_.get("k_per_step", [])) or "–"
            L.append(
                f"| {s_['mode']} | {s_['model']} ({s_.get('layers')}) | {s_['batch']} | {_fmt(s_['ratio'], 'g')} "
                f"| {s_['router_layers']} | {s_['warmup_steps']} | {ks} | {_fmt(s_.get('distinct_k'), 'd')} "
                f"| {compiles_cell(s_)} | {s_.get('recompile_limit_hit', '–')} | {_fmt(s_.get('wall_s'), '.1f')} | {status} |"
            )
    L.append("")
    return "\n".join(L)


def plot(path: Path, meta: dict, records: list[dict]) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        return f"no PNG: {err}"
    groups = combos(records)
    if not groups:
        return "no PNG: nothing measured"
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 * len(groups) + 2), 4.5))
    width = 0.8 / len(ALL_MODES)
    for j, mode in enumerate(ALL_MODES):
        xs, ys, lo, hi = [], [], [], []
        for i, (model, ratio, rl) in enumerate(groups):
            r = find(records, mode, model, ratio, rl) if mode != "router_only" else next(
                (x for x in records if x["mode"] == mode and x["model"] == model and x.get("router_layers") == rl), None)
            ms = ok_ms(r)
            if ms is None:
                continue
            xs.append(i + (j - (len(ALL_MODES) - 1) / 2) * width)
            ys.append(ms)
            lo.append(ms - r["p10_ms"])
            hi.append(r["p90_ms"] - ms)
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, error_kw=dict(elinewidth=0.8), label=mode)
    labels = [f"{m}\nr={_fmt(r, 'g')} L={_fmt(l, 'd')}" for m, r, l in groups]
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("median step time, ms (p10–p90)")
    ax.set_title(f"{meta.get('name')}: {meta.get('device_name')}", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(out_dir: Path, stem: str, meta: dict, records: list[dict], schedules: list[dict],
                  predictions: list[dict], png: bool) -> str:
    data = dict(meta=meta, records=records, derived=derive(records), schedules=schedules, predictions=predictions)
    md = markdown(meta, records, schedules, predictions)
    paths = write_report(out_dir, stem, data, md)
    if png:
        note = plot(out_dir / f"{stem}.png", meta, records)
        if note:
            meta["png"] = note
        else:
            paths.append(out_dir / f"{stem}.png")
    copy_to_out(paths, out_dir)
    return md


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES))
    p.add_argument("--ratios", nargs="+", type=float)
    p.add_argument("--router-layers", nargs="+", type=int)
    p.add_argument("--modes", nargs="+", choices=ALL_MODES)
    p.add_argument("--steps", type=int, help="timed steps per mode")
    p.add_argument("--warmup", type=int, help="warm-up steps per mode (the first one is the cold compile)")
    p.add_argument("--batch", type=int, help="override every shape's batch size")
    p.add_argument("--seq", type=int, help="override every shape's sequence length")
    p.add_argument("--scoring", default=None, help="the CGGR modes' scoring (default: the library's)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile-backend", default=None,
                   help="backend of the non-cggr compiled modes (default: inductor on CUDA, eager on CPU)")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile (cggr_backend is then skipped)")
    p.add_argument("--no-autocast", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (tiny preset: 1, robust on a shared CPU)")
    p.add_argument("--tf32", action="store_true", help="set_float32_matmul_precision('high') (default: torch's default)")
    p.add_argument("--keep-caches", action="store_true",
                   help="do not set TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 (cold compile times then lie)")
    p.add_argument("--schedule", choices=("none", "first", "all", "only"),
                   help="compilation count over a warmup schedule: on the first shape, on all, or only that")
    p.add_argument("--schedule-layers", type=int, default=None,
                   help="decoder layers of the schedule's model (default router_layers + 2; 0 = the shape's own)")
    p.add_argument("--schedule-warmup", type=int, help="warmup_steps of the schedule run (gpu preset: 8)")
    p.add_argument("--schedule-steps", type=int, help="steps of the schedule run (gpu preset: 12)")
    p.add_argument("--time-budget", type=float, help="seconds; skip (and record) what would not fit; 0 = none")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--name", default=None, help="output name (default: the preset, plus a suffix if the grid differs)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--skip-ceilings", action="store_true")
    p.add_argument("--fused-loss", action="store_true",
                   help="add the mode compiled_fused_loss (the full batch, its loss by the fused head + "
                        "cross-entropy of cggr_compile.ops.fused_linear_ce: what the fusion alone buys) and "
                        "run random_subset and the CGGR modes with the fused loss too")
    p.add_argument("--cudagraphs", action="store_true",
                   help="CUDA graphs in every compiled mode: mode='reduce-overhead' for Inductor, "
                        "options cudagraphs=True for the cggr backend")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 steps per mode: host time, kernel time, kernel count, top kernels")
    p.add_argument("--merge", nargs="+", default=None, help="merge these JSON results into one report and exit")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    grid_overridden = any(getattr(args, key) is not None for key in ("models", "ratios", "router_layers", "batch", "seq"))
    for key, val in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
    if args.modes is None:
        args.modes = [m for m in ALL_MODES if m in DEFAULT_MODES or args.fused_loss]
    if args.name is None:
        args.name = args.preset
        if grid_overridden:
            args.name += "-" + "_".join([
                "+".join(args.models), "r" + "+".join(f"{r:g}" for r in args.ratios),
                "L" + "+".join(str(x) for x in args.router_layers)]
                + ([f"b{args.batch}"] if args.batch else []) + ([f"t{args.seq}"] if args.seq else []))
    return args


def merge(args: argparse.Namespace) -> int:
    records, schedules, predictions, metas = [], [], [], []
    for f in args.merge:
        d = json.loads(Path(f).read_text())
        metas.append(d["meta"])
        records += d["records"]
        schedules += d.get("schedules", [])
        predictions += d.get("predictions", [])
    models = {r["model"] for r in records}
    predictions = list({(p["model"], p["ratio"], p["router_layers"]): p for p in predictions
                        if p["model"] in models}.values())
    meta = dict(metas[0])
    meta["name"] = args.name if args.name != args.preset else "merged"
    meta["command"] = " ; ".join(m.get("command", "?") for m in metas)
    meta["merged_from"] = [str(f) for f in args.merge]
    stem = result_stem("speed", meta["name"], meta.get("device_slug", "unknown"))
    md = write_outputs(Path(args.out_dir), stem, meta, records, schedules, predictions, not args.no_png)
    print(md)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda" and args.tf32:
        torch.set_float32_matmul_precision("high")
    ctx = Ctx(args, device)
    cggr_compile = require_cggr_compile()  # registers the backend; says what to run when it is not installed
    import transformers

    try:
        import torch._inductor.config as ind_cfg

        fdc = bool(ind_cfg.force_disable_caches)
    except Exception:  # noqa: BLE001
        fdc = os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES")
    meta: dict[str, Any] = dict(
        name=args.name, preset=args.preset, device=str(device), device_name=device_name(device),
        device_slug=device_slug(device), versions=versions(), argv=sys.argv, command=command_line("speed.py", argv),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        settings=dict(steps=args.steps, warmup=args.warmup,
                      scoring=args.scoring or cggr_compile.CGGRConfig().scoring,
                      selection=cggr_compile.CGGRConfig().selection,
                      autocast=device.type == "cuda" and not args.no_autocast,
                      fused_adamw=device.type == "cuda", no_compile=args.no_compile,
                      compile_backend=args.compile_backend or ("inductor" if device.type == "cuda" else "eager"),
                      force_disable_caches=fdc, fresh_cache_dir_per_mode=not args.keep_caches,
                      float32_matmul_precision=torch.get_float32_matmul_precision(),
                      schedule=args.schedule, time_budget=args.time_budget,
                      models=args.models, ratios=args.ratios, router_layers=args.router_layers,
                      modes=args.modes, batch=args.batch, seq=args.seq, profile=args.profile,
                      cudagraphs=args.cudagraphs and device.type == "cuda"),
    )
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        meta["device_props"] = dict(total_memory_gib=prop.total_memory / 2 ** 30, sm_count=prop.multi_processor_count,
                                    capability=f"{prop.major}.{prop.minor}")
    log(f"# speed: {meta['device_name']}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"triton {meta['versions'].get('triton') or meta['versions'].get('pytorch-triton')}; "
        f"TORCHINDUCTOR_FORCE_DISABLE_CACHES={fdc}")
    log(f"# command: {meta['command']}")
    stem = result_stem("speed", args.name, meta["device_slug"])
    out_dir = Path(args.out_dir)
    records: list[dict] = []
    schedules: list[dict] = []
    predictions: list[dict] = []

    ceilings: dict[str, float] = {}
    if device.type == "cuda" and not args.skip_ceilings:
        try:
            ceilings = measure_ceilings(device)
            log(f"# ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s")
        except Exception as err:  # noqa: BLE001
            log(f"# ceilings not measured: {err}")
    meta["ceilings"] = ceilings

    def shape_of(name: str) -> dict[str, Any]:
        s = dict(SHAPES[name])
        if args.batch:
            s["batch"] = args.batch
        if args.seq:
            s["seq"] = args.seq
        return s

    # ---- predictions, printed before any measurement
    log("\n# predicted work per step (forward+backward = 3 x forward; attention causal; embedding gather free)")
    for name in args.models:
        sh = shape_of(name)
        for ratio in args.ratios:
            for rl in args.router_layers:
                try:
                    p = predict(sh, sh["batch"], sh["seq"], rows_for(ratio, sh["batch"]), rl, ceilings)
                except Exception as err:  # noqa: BLE001
                    log(f"#   {name}: prediction failed: {err}")
                    continue
                p.update(model=name, ratio=ratio, router_layers=rl)
                predictions.append(p)
                pc = p["params"]
                line = (f"#   {name} B={sh['batch']} T={sh['seq']} ratio={ratio:g} k={p['k']} router={rl}: params body "
                        f"{pc['body'] / 1e6:.1f}M + embedding {pc['embedding'] / 1e6:.1f}M"
                        f"{' (tied lm_head)' if pc['tied'] else ''}; router body {pc['router_body'] / 1e6:.1f}M")
                log(line)
                for key in ("full", "random_subset", "router_only", "cggr"):
                    e = p[key]
                    parts = ", ".join(f"{n} {v / 1e9:,.4g}" for n, v in e["flops"].items())
                    fl = (f"; floor {e['floor_ms']:.1f} ms (flops {e['floor_ms_flops']:.1f}, bytes {e['floor_ms_bytes']:.1f})"
                          if "floor_ms" in e else "")
                    log(f"#     {key:13s} {e['flops_total'] / 1e9:9,.4g} GFLOP ({parts}); >= {e['bytes_min'] / 1e9:.3g} GB{fl}")

    # ---- the work list, in priority order
    todo: list[tuple[str, str, float, int]] = []
    seen: set = set()
    if args.schedule != "only":
        for name in args.models:
            for ratio in args.ratios:
                for rl in args.router_layers:
                    for mode in args.modes:
                        key = (mode, name) if mode in FULL_BATCH_MODES else \
                              (mode, name, ratio) if mode == "random_subset" else \
                              (mode, name, rl) if mode == "router_only" else (mode, name, ratio, rl)
                        if key not in seen:
                            seen.add(key)
                            todo.append((mode, name, ratio, rl))
    sched: list[tuple[str, str, float, int]] = []
    if args.schedule != "none":
        names = args.models[:1] if args.schedule in ("first", "only") else args.models
        for name in names:
            for mode in CGGR_MODES:
                if mode in args.modes:
                    sched.append((mode, name, args.ratios[0], args.router_layers[0]))

    longest = 0.0
    budget = args.time_budget or 0.0

    def over_budget(estimate: float) -> bool:
        return budget > 0 and time.perf_counter() - t_start + estimate > budget

    for mode, name, ratio, rl in todo:
        sh = shape_of(name)
        if over_budget(longest):
            rec = dict(mode=mode, model=name, batch=sh["batch"], seq=sh["seq"], ratio=ratio, router_layers=rl,
                       k=rows_for(ratio, sh["batch"]), status="skipped",
                       error=f"skipped: time budget {budget:.0f} s (elapsed {time.perf_counter() - t_start:.0f} s, "
                             f"longest mode so far {longest:.0f} s)")
            if mode in FULL_BATCH_MODES:
                rec["ratio"], rec["router_layers"], rec["k"] = None, None, sh["batch"]
            elif mode == "random_subset":
                rec["router_layers"] = None
        else:
            log(f"\n# {name} {mode} ratio={ratio:g} router={rl} (elapsed {time.perf_counter() - t_start:.0f} s)")
            with fresh_caches(args):
                rec = run_mode(mode, name, sh, ratio, rl, ctx, sh["batch"], sh["seq"])
            longest = max(longest, rec.get("mode_wall_s", 0.0))
        if rec["status"] == "ok":
            log(f"#   median {rec['median_ms']:.2f} ms (p10 {rec['p10_ms']:.2f}, p90 {rec['p90_ms']:.2f}), "
                f"cold {rec['cold_compile_s']:.1f} s, compiles {compiles_cell(rec)}, sync {sync_cell(rec)}, "
                f"peak {_fmt(rec.get('peak_mem_gib'), '.2f')} GiB, mode {rec['mode_wall_s']:.0f} s")
            pr = rec.get("profile") or {}
            if "wall_ms" in pr:
                log(f"#   profile: wall {pr['wall_ms']:.1f} ms, host enqueue {pr['host_ms']:.1f} ms, kernels "
                    f"{pr['gpu_busy_ms']:.1f} ms busy in {pr['kernels_per_step']:.0f} kernels; top: " +
                    "; ".join(f"{k['name'][:50]} {k['ms_per_step']:.2f}" for k in pr["top_kernels"][:6]))
        else:
            log(f"#   {rec['status']}: {rec.get('error')}")
        records.append(rec)
        write_outputs(out_dir, stem, meta, records, schedules, predictions, png=False)

    for mode, name, ratio, rl in sched:
        sh = shape_of(name)
        if over_budget(longest):
            schedules.append(dict(mode=mode, model=name, layers=None, batch=sh["batch"], seq=sh["seq"], ratio=ratio,
                                  router_layers=rl, warmup_steps=args.schedule_warmup, steps=args.schedule_steps,
                                  status="skipped", error=f"skipped: time budget {budget:.0f} s"))
            log(f"\n# schedule {name} {mode}: skipped (time budget)")
        else:
            log(f"\n# schedule {name} {mode}: warmup_steps={args.schedule_warmup}, {args.schedule_steps} steps "
                f"(elapsed {time.perf_counter() - t_start:.0f} s)")
            with fresh_caches(args):
                s = run_schedule(mode, name, sh, ratio, rl, ctx, sh["batch"], sh["seq"])
            log(f"#   {s['status']}: k per step {s.get('k_per_step')}, compiles {compiles_cell(s)}, "
                f"{s.get('wall_s', 0):.0f} s {s.get('error', '')}")
            schedules.append(s)
        write_outputs(out_dir, stem, meta, records, schedules, predictions, png=False)

    meta["total_wall_s"] = time.perf_counter() - t_start
    md = write_outputs(out_dir, stem, meta, records, schedules, predictions, png=not args.no_png)
    log(f"\n# wrote {out_dir / stem}.{{json,md{',png' if not args.no_png and 'png' not in meta else ''}}} "
        f"in {meta['total_wall_s']:.0f} s\n")
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
