"""Benchmark: the main pass's loss, compiled lm_head + cross-entropy against the fused op.

    python benchmarks/bench_fused_loss.py --out fused_loss.json          # CUDA: the full grid, bf16
    python benchmarks/bench_fused_loss.py --smoke --out /tmp/smoke.json  # any device (CPU in CI)

For every token count N (default 4096, 16384), hidden size H (576, 960, 2048) and vocabulary V
(49152, 128256) it times, side by side in one process on the same random bf16 inputs (~10 % of the
labels -100, the rest selected), the loss's forward and backward (``torch.autograd.grad`` w.r.t. the
hidden states and the head's weight):

* ``compiled``: ``torch.compile`` of the standard path, ``F.linear`` + ``scoring.selective_cross_entropy``
  (float32 logits, Inductor), what the main pass does without the fusion;
* ``fused``: ``cggr_compile.ops.fused_linear_ce.selective_linear_cross_entropy`` called eagerly (its
  chunk epilogue compiled by Inductor on CUDA);
* ``fused_compiled``: the fused loss inside a ``torch.compile(fullgraph=True)`` function, as the
  routed step calls it;
* ``fused_eager_chunks``: the fused loss with ``CGGR_FUSED_LOSS_COMPILE_CHUNKS=0`` (the chunk's
  element-wise work in eager torch): what compiling the epilogue buys;
* ``fused_c<k>`` (``--chunk-elements 2**k ...``): the fused loss with chunks of at most ``2**k``
  logits (the default is ``2**27``), to tune the chunk size.

On CUDA each step is captured in a CUDA graph (after warm-up on a side stream) and timed by replays
with CUDA events (median, 20th and 80th percentiles); a path that cannot be captured is timed without
a graph and says so. Peak memory is ``torch.cuda.max_memory_allocated`` above the inputs for one
step outside the graph. Each path's loss and gradients are compared with ``compiled``'s
(the largest absolute loss difference and the relative L2 error of each gradient). Prints a short
table and writes everything to ``--out`` as JSON.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (device_name, kernel_bench_device, kernel_bench_out,  # noqa: E402
                               kernel_bench_parser, kernel_bench_report, log, peak_extra_bytes,
                               percentiles_ms, print_path_table, require_cggr_compile, time_calls, write_json)

require_cggr_compile()
from cggr_compile.ops import fused_linear_ce as flce  # noqa: E402
from cggr_compile.scoring import selective_cross_entropy  # noqa: E402

TOKENS = (4096, 16384)
HIDDEN = (576, 960, 2048)
VOCAB = (49152, 128256)
SMOKE = dict(tokens=(48,), hidden=(16,), vocab=(101, 7))


def standard_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    return selective_cross_entropy(F.linear(h, w), y, sel)


def fused_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    return flce.selective_linear_cross_entropy(h, w, None, y, sel)


def fused_loss_chunked(max_elements: int) -> Callable:
    """The fused loss with chunks of at most ``max_elements`` logits (``--chunk-elements``)."""
    def fn(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        chunk = flce.default_chunk_tokens(h.shape[0], w.shape[0], max_elements)
        return flce.selective_linear_cross_entropy(h, w, None, y, sel, chunk_tokens=chunk)
    return fn


def make_step(loss_fn: Callable, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, sel: torch.Tensor,
              env: Optional[dict] = None) -> Callable[[], tuple]:
    def step() -> tuple:
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            loss = loss_fn(h, w, y, sel)
            gh, gw = torch.autograd.grad(loss, (h, w))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return loss.detach(), gh, gw
    return step


def _cuda_graph(step: Callable, warmup: int) -> tuple[Callable, tuple]:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    return g.replay, out


def time_path(step: Callable, device: torch.device, reps: int, use_graphs: bool) -> dict[str, Any]:
    """Median / p20 / p80 milliseconds of one forward+backward, its outputs and how it was run."""
    res: dict[str, Any] = {}
    run, out = step, None
    if device.type == "cuda" and use_graphs:
        try:
            run, out = _cuda_graph(step, warmup=3)
            res["cuda_graph"] = True
        except Exception as err:  # noqa: BLE001 - report and time it without a graph
            res["cuda_graph"] = False
            res["cuda_graph_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            torch.cuda.synchronize()
            run = step
    # warm-up (and compilation); on CUDA each replay is synchronised, so none overlaps the next's launch
    for _ in range(3 if device.type == "cuda" else 1):
        run()
    times, last = time_calls(lambda _: run(), reps, device, sync_each=True)
    out = out if out is not None else last
    res.update(percentiles_ms(times))
    return res | {"_out": tuple(t.clone() for t in out)}


def compare(out: tuple, ref: tuple) -> dict[str, float]:
    loss, gh, gw = (t.double() for t in out)
    rloss, rgh, rgw = (t.double() for t in ref)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    return {"loss_abs_diff": float((loss - rloss).abs()), "grad_hidden_rel_l2": rel(gh, rgh),
            "grad_weight_rel_l2": rel(gw, rgw)}


def run_case(n: int, h_dim: int, v: int, device: torch.device, dtype: torch.dtype, paths: dict,
             reps: int, use_graphs: bool, log: Callable) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(n + h_dim + v)
    h = torch.randn(n, h_dim, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h_dim, generator=g) * h_dim ** -0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    y = y.to(device)
    sel = (y != -100)
    case: dict[str, Any] = {"N": n, "H": h_dim, "V": v, "chunk_tokens": flce.default_chunk_tokens(n, v),
                            "logits_fp32_bytes": n * v * 4, "paths": {}}
    ref = None
    for name, (fn, env) in paths.items():
        step = make_step(fn, h, w, y, sel, env)
        try:
            r = time_path(step, device, reps, use_graphs)
            r["peak_extra_bytes"] = peak_extra_bytes(step, device)
        except Exception as err:  # noqa: BLE001 - one failing path must not hide the others
            case["paths"][name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            log(f"N={n} H={h_dim} V={v} {name}: ERROR {case['paths'][name]['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        out = r.pop("_out")
        if ref is None:
            ref = out
        r.update(compare(out, ref))
        case["paths"][name] = r
        log(f"N={n} H={h_dim} V={v} {name}: {r['median_ms']:.3f} ms"
            + (f", peak {r['peak_extra_bytes'] / 2**20:.0f} MiB" if r["peak_extra_bytes"] is not None else ""))
        del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = case["paths"].get("compiled", {}).get("median_ms")
    for r in case["paths"].values():
        if base and "median_ms" in r:
            r["speedup_vs_compiled"] = base / r["median_ms"]
    return case


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = kernel_bench_parser(__doc__, "smoke", "tiny shapes on any device (the CPU test runs this)", TOKENS,
                             "timed repetitions (default 20 on CUDA, 3 on CPU)", "fused_loss")
    ap.add_argument("--hidden", type=int, nargs="+", default=None, help=f"hidden sizes (default {HIDDEN})")
    ap.add_argument("--vocab", type=int, nargs="+", default=None, help=f"vocabulary sizes (default {VOCAB})")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="time without CUDA graphs")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the compiled paths (the smoke test uses aot_eager)")
    ap.add_argument("--chunk-elements", type=int, nargs="+", default=(),
                    help=f"also time the fused loss with chunks of at most these many logits each "
                         f"(a path 'fused_c<log2>' per value; the default is {flce.CHUNK_ELEMENTS} = 2**27)")
    args = ap.parse_args(argv)

    device = kernel_bench_device(ap, args.device, args.smoke, "smoke")
    dtype = torch.bfloat16
    grid = SMOKE if args.smoke else dict(tokens=TOKENS, hidden=HIDDEN, vocab=VOCAB)
    tokens, hidden, vocab = args.tokens or grid["tokens"], args.hidden or grid["hidden"], args.vocab or grid["vocab"]
    reps = args.reps or (20 if device.type == "cuda" else 3)
    use_graphs = device.type == "cuda" and not args.no_cuda_graphs
    be = args.compile_backend
    paths = {
        "compiled": (torch.compile(standard_loss, backend=be, dynamic=False), None),
        "fused": (fused_loss, None),
        "fused_compiled": (torch.compile(fused_loss, backend=be, fullgraph=True, dynamic=False), None),
        "fused_eager_chunks": (fused_loss, {"CGGR_FUSED_LOSS_COMPILE_CHUNKS": "0"}),
    }
    for e in args.chunk_elements:
        paths[f"fused_c{e.bit_length() - 1}"] = (fused_loss_chunked(e), None)

    log(f"device: {device_name(device)}; torch {torch.__version__}; cuda graphs {use_graphs}")
    cases = []
    for v in vocab:
        for h_dim in hidden:
            for n in tokens:
                torch._dynamo.reset()  # each shape compiles on its own (no recompile-limit surprises)
                cases.append(run_case(n, h_dim, v, device, dtype, paths, reps, use_graphs, log))

    result = kernel_bench_report(
        "fused_loss", device, "bench_fused_loss.py", argv,
        smoke=args.smoke,
        dtype=str(dtype),
        compile_backend=be,
        cuda_graphs=use_graphs,
        timing=("CUDA-graph replays timed with CUDA events, median" if use_graphs else
                "CUDA events, median" if device.type == "cuda" else "time.perf_counter median"),
        measures="forward + backward (autograd.grad w.r.t. hidden and weight) of the selective loss",
        peak_extra_bytes="torch.cuda.max_memory_allocated above the inputs, one step outside the graph",
        errors="each path against 'compiled' (loss absolute difference, gradients' relative L2)",
        cases=cases,
    )
    log(f"wrote {write_json(kernel_bench_out(args.out, 'fused_loss', device, '-smoke' if args.smoke else ''), result)}")

    def cell(r: dict) -> str:
        mib = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        gerr = max(r["grad_hidden_rel_l2"], r["grad_weight_rel_l2"])
        return f"{r['median_ms']:9.3f} {r.get('speedup_vs_compiled', float('nan')):5.2f} {mib:>6} {gerr:.0e}"

    print_path_table(cases, list(paths), {"N": 6, "H": 5, "V": 7}, f"{'ms':>9} {'x':>5} {'MiB':>6} {'gerr':>3}", 26, cell)
    print("x: speed-up over 'compiled'; MiB: peak memory above the inputs; gerr: gradients' relative L2 "
          "error against 'compiled'")
    return result


if __name__ == "__main__":
    main()
