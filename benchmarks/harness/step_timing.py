"""The speed benchmark's modes and how each is timed: setup, isolated timing (CUDA graphs optional),
the host-sync and compile checks, and the work a step must do at least (predictions, ceilings).

``benchmarks/speed.py`` sets ``TORCHINDUCTOR_FORCE_DISABLE_CACHES`` before it imports this module,
which imports torch: import it only after that.

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

Figures per mode (``run_mode``'s record: the JSON has them all, the markdown table the main ones;
``speed_report`` derives the ratios from them):

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
* schedule compilations (``--schedule``, ``run_schedule``): for the two CGGR modes, a fresh model with
  ``warmup_steps=--schedule-warmup`` (8) runs ``--schedule-steps`` (12) steps calling ``step()`` after
  each; the same counters are reported, with the ``k`` of every step (from the CGGR metrics) and
  every step's wall time. By default it runs once (``first`` shape) on a shallower copy of that
  shape (``--schedule-layers``, default router_layers + 2): the count depends on B, the ratio
  levels and the schedule, not on depth, and 8 cold compiles of a 30-layer model would not fit
  the time budget. ``--schedule-layers 0`` keeps the full depth.
* host synchronisation: one more step under ``torch.cuda.set_sync_debug_mode("error")`` (reset to
  0 afterwards); ``syncs: false`` when it ran through, else the error message.

Before measuring, the script measures the device's two ceilings (``measure_ceilings``: a bf16 matmul
and a device-to-device copy) and prints, per shape, the predicted FLOPs (``predict``:
``6 * params * tokens`` for forward + backward of the trained rows, attention and the lm_head counted
separately, ``2 * router params * B * T`` for the router) and the bytes the optimizer must move, with
the floor time they imply.

Each mode runs inside try/except (``run_isolated``): a failure records its error and the rest still
run. A mode whose CGGR metrics are missing or whose ``k`` differs from the expected one is marked
``not_routed``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import statistics
import time
import traceback
import warnings
from typing import Any, Callable, Optional

import torch

from benchmarks.common import (adamw, build_llama, llama_config, percentile, profile_steps, random_batches, rows_for,
                               sync, time_calls)

ALL_MODES = ("eager", "compiled", "compiled_fused_loss", "random_subset", "router_only", "cggr_backend",
             "cggr_transform")
FULL_BATCH_MODES = ("eager", "compiled", "compiled_fused_loss")
CGGR_MODES = ("cggr_backend", "cggr_transform")


# ------------------------------------------------------------------------------------------ helpers
def free_memory(device: torch.device) -> None:
    """Drops Dynamo's compiled code and the garbage before and after a run, so that a mode's memory
    and compilations start from nothing."""
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
    """Dynamo's unique graphs, AOTAutograd compilations and graph breaks so far in this process."""
    c = torch._dynamo.utils.counters
    return {
        "unique_graphs": int(c["stats"].get("unique_graphs", 0)),
        "aot_autograd_compiles": int(c["aot_autograd"].get("total", 0)),
        "graph_breaks": int(sum(c["graph_break"].values())),
    }


def counter_delta(before: dict[str, int]) -> dict[str, int]:
    """The counters' increase since ``before`` (a ``counter_snapshot``)."""
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
        """The distinct Python warnings of the run, at most 10."""
        return sorted({str(w.message)[:400] for w in self._caught})[:10]

    def track(self, model: torch.nn.Module) -> None:
        """Remembers the run's model weakly, for ``model_freed``."""
        import weakref

        self._model = weakref.ref(model)

    def model_freed(self) -> bool:
        """Whether nothing keeps the tracked model alive any more."""
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

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA unless ``--no-autocast``; a disabled one otherwise."""
        if self.cuda and not self.args.no_autocast:
            return torch.autocast("cuda", torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def compile(self, fn: Any) -> Any:
        """``torch.compile`` of a non-cggr compiled mode (``--compile-backend``; reduce-overhead under
        ``--cudagraphs``), or ``fn`` itself under ``--no-compile``."""
        if self.args.no_compile:
            return fn
        backend = self.args.compile_backend or ("inductor" if self.cuda else "eager")
        if self.cudagraphs and backend == "inductor":
            return torch.compile(fn, backend=backend, mode="reduce-overhead")
        return torch.compile(fn, backend=backend)

    @property
    def cudagraphs(self) -> bool:
        """``--cudagraphs`` on a CUDA device."""
        return self.cuda and self.args.cudagraphs

    def cggr_options(self, ratio: float, router_layers: int, warmup_steps: int = 0) -> dict[str, Any]:
        """The CGGR modes' options: every step trains exactly ``k`` rows (no dynamic threshold)."""
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
    """Warm-up steps (the first is the cold compile), then ``steps`` timed ones: the step-time
    figures, peak memory over the timed steps and the last loss."""
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


def mode_record(mode: str, model_name: str, batch: int, seq: int, ratio: float, router_layers: int,
                status: str = "ok", **extra: Any) -> dict[str, Any]:
    """A mode's record before it runs (also the record of one the time budget skips): the
    configuration it is keyed by. A full-batch mode has no ratio nor router and trains all ``batch``
    rows; ``random_subset`` has no router."""
    rec: dict[str, Any] = dict(mode=mode, model=model_name, batch=batch, seq=seq, ratio=ratio,
                               router_layers=router_layers, k=rows_for(ratio, batch), status=status, **extra)
    if mode in FULL_BATCH_MODES:
        rec["ratio"], rec["router_layers"], rec["k"] = None, None, batch
    elif mode == "random_subset":
        rec["router_layers"] = None
    return rec


def run_mode(mode: str, model_name: str, shape: dict[str, Any], ratio: float, router_layers: int,
             ctx: Ctx, batch: int, seq: int) -> dict[str, Any]:
    """One mode on a fresh model of ``shape``: timed steps, compile counts, routing and sync checks,
    recorded (an error included, see ``run_isolated``) into the mode's record."""
    k = rows_for(ratio, batch)
    rec = mode_record(mode, model_name, batch, seq, ratio, router_layers)
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

