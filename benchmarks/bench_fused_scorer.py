"""Benchmark of the fused router scorer against the unfused paths it replaces.

    python benchmarks/bench_fused_scorer.py                 # CUDA: the real heads, bf16
    python benchmarks/bench_fused_scorer.py --tiny          # any device (CPU in CI): tiny sizes, checks the script

For every token count N (default 16384 and 1024) and output head (H, V) (default (576, 49152),
(960, 49152), (2048, 128256): SmolLM-135M, SmolLM-360M, Llama-3.2-1B) it measures, on one set of
random bf16 inputs with ~1/3 of the labels -100:

* ``gemm``: the bare ``hidden @ W.T`` (bf16 logits; cuBLAS) -- the practical floor;
* ``unfused``: what an unfused router does: float32 logits, log_softmax, entropy, topk(2), gather
  (the same math as ``cggr_compile.scoring.token_stats``);
* ``unfused_compiled``: that function under ``torch.compile`` (Inductor);
* ``fused``: ``cggr_compile.ops.fused_scorer.fused_token_stats`` (Triton on CUDA);
* ``fused_compiled``: the fused op called inside a ``torch.compile`` d function (Inductor inlines the
  Triton kernels into its graph).

For each: median time (``triton.testing.do_bench``, which clears the L2 cache between runs; 20th and
80th percentiles too), peak memory allocated above the inputs, and the largest error of each output
(lse, entropy, p1, p2, nll) against a float64 reference computed from the same bf16 inputs.
Writes ``benchmarks/results/fused_scorer_<device-slug>[-tiny].json`` and prints a short table last.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (device_name, kernel_bench_device, kernel_bench_out,  # noqa: E402
                               kernel_bench_parser, kernel_bench_report, log, peak_extra_bytes,
                               percentiles_ms, print_path_table, require_cggr_compile, time_calls, write_json)

require_cggr_compile()
from cggr_compile.ops import fused_scorer as fs  # noqa: E402

IGN = -100
HEADS = {"smollm135m": (576, 49152), "smollm360m": (960, 49152), "llama3.2-1b": (2048, 128256)}
TINY_HEADS = {"tiny-a": (32, 1000), "tiny-b": (48, 2001)}
OUTPUTS = ("lse", "entropy", "p1", "p2", "nll")


# ----------------------------------------------------------------------------------------------
# the paths
# ----------------------------------------------------------------------------------------------
def gemm(h, w, labels):
    return h @ w.T


def unfused(h, w, labels):
    z = (h @ w.T).float()
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    top2 = torch.topk(p, 2, dim=-1).values
    lse = torch.logsumexp(z, dim=-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(labels != IGN, nll, torch.zeros_like(nll))
    return lse, entropy, top2[:, 0], top2[:, 1], nll


def fused(h, w, labels):
    return fs.fused_token_stats(h, w, None, labels)


def reference(h, w, labels, max_elems=1 << 26):
    """float64 statistics from explicit logits, over token chunks (on the inputs' device)."""
    N, V = h.shape[0], w.shape[0]
    w64 = w.double()
    step = max(1, max_elems // V)
    outs = [[] for _ in OUTPUTS]
    for i in range(0, N, step):
        z = h[i:i + step].double() @ w64.T
        lse = torch.logsumexp(z, dim=1)
        logp = z - lse[:, None]
        p = logp.exp()
        lab = labels[i:i + step]
        nll = -logp.gather(1, lab.clamp(min=0)[:, None])[:, 0]
        top = torch.topk(p, 2, dim=1).values
        for k, v in enumerate(
            (lse, -(p * logp).sum(1), top[:, 0], top[:, 1], torch.where(lab == IGN, torch.zeros_like(nll), nll))
        ):
            outs[k].append(v)
        del z, logp, p
    return [torch.cat(o) for o in outs]


def errors(out, ref):
    res = {}
    for name, o, r in zip(OUTPUTS, out, ref):
        o = o.double()
        finite = bool(torch.isfinite(o).all())
        d = (o - r).abs()
        res[name] = {
            "max_abs": float(d.max()) if finite else float("nan"),
            "max_rel": float((d / r.abs().clamp(min=1e-6)).max()) if finite else float("nan"),
            "rel_l2": float(d.norm() / r.norm().clamp(min=1e-30)) if finite else float("nan"),
            "all_finite": finite,
        }
    return res


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
def time_fn(fn, device, reps):
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=50, rep=max(100, reps * 10), quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    return percentiles_ms(time_calls(lambda _: fn(), reps, device)[0])


def autotune_choices():
    res = {}
    if not fs.HAS_TRITON:
        return res
    for name in ("_partial_16", "_partial_32"):
        at = getattr(fs, name, None)
        cache = getattr(at, "cache", None) or {}
        for key, cfg in cache.items():
            res[f"{name}{list(key)}"] = str(cfg)
    return res


def run_case(N, H, V, device, dtype, paths, reps, seed, log):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).to(device)
    w = (torch.randn(V, H, generator=g) * (3.0 / math.sqrt(H))).to(dtype).to(device)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.33] = IGN
    labels = labels.to(device)
    ref = reference(h, w, labels)
    flops = 2.0 * N * V * H
    min_bytes = (N * H + V * H) * h.element_size() + N * 8 + 5 * N * 4
    case = {"N": N, "H": H, "V": V, "dtype": str(dtype), "flops": flops, "min_bytes": min_bytes, "paths": {}}
    for name, fn in paths.items():
        rec = {}
        try:
            t0 = time.perf_counter()
            out = fn(h, w, labels)  # first call: compiles / autotunes
            if device.type == "cuda":
                torch.cuda.synchronize()
            rec["first_call_s"] = time.perf_counter() - t0
            for _ in range(2):
                fn(h, w, labels)
            if name != "gemm":
                rec["errors"] = errors(out, ref)
                rec["max_abs_error"] = max(e["max_abs"] for e in rec["errors"].values())
            del out
            rec.update(time_fn(lambda: fn(h, w, labels), device, reps))
            rec["peak_extra_bytes"] = peak_extra_bytes(lambda: fn(h, w, labels), device)
            rec["tflops"] = flops / (rec["median_ms"] * 1e-3) / 1e12
        except Exception as e:  # record and go on (e.g. out of memory for the unfused path)
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        case["paths"][name] = rec
        log(f"  N={N} H={H} V={V} {name}: " + (rec.get("error") or f"{rec['median_ms']:.3f} ms"))
    gm = case["paths"].get("gemm", {}).get("median_ms")
    if gm:
        for rec in case["paths"].values():
            if "median_ms" in rec:
                rec["x_gemm"] = rec["median_ms"] / gm
    return case


def epilogue_fit(cases):
    """Split the fused time into MMA and softmax-epilogue parts: for heads that share N and V but
    differ in H, fit ``t = a * (2 N V H) + b * (N V)``; ``b`` is the epilogue's cost per logit."""
    fits = []
    by_nv = {}
    for c in cases:
        r = c["paths"].get("fused", {})
        if "median_ms" in r:
            by_nv.setdefault((c["N"], c["V"]), []).append((c["H"], r["median_ms"] * 1e-3))
    for (N, V), pts in by_nv.items():
        if len({h for h, _ in pts}) < 2:
            continue
        (h1, t1), (h2, t2) = sorted(pts)[0], sorted(pts)[-1]
        a = (t2 - t1) / (2.0 * N * V * (h2 - h1))  # seconds per flop
        b = (t1 - a * 2.0 * N * V * h1) / (N * V)  # seconds per logit
        fits.append({
            "N": N, "V": V, "H": [h1, h2],
            "mma_tflops": (1.0 / a / 1e12) if a > 0 else None,
            "epilogue_ns_per_1k_logits": b * 1e12,
            "epilogue_ms_at_H1": b * N * V * 1e3,
        })
    return fits


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = kernel_bench_parser(__doc__, "tiny", "tiny sizes on any device (CI smoke test)", (16384, 1024),
                             "timed repetitions (CPU) / rep scale (CUDA)", "fused_scorer")
    ap.add_argument("--heads", nargs="+", default=None, help=f"head names from {sorted(HEADS)} or HxV")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--compile-cpu", action="store_true", help="also run the torch.compile rows on the CPU")
    args = ap.parse_args(argv)

    device = kernel_bench_device(ap, args.device, args.tiny, "tiny")
    dtype = torch.bfloat16
    if args.tiny:
        tokens = args.tokens or [64, 16]
        heads = dict(TINY_HEADS)
    else:
        tokens = args.tokens or [16384, 1024]
        heads = dict(HEADS)
    if args.heads:
        sel = {}
        for hname in args.heads:
            if hname in HEADS:
                sel[hname] = HEADS[hname]
            else:
                hh, vv = hname.lower().split("x")
                sel[hname] = (int(hh), int(vv))
        heads = sel
    reps = args.reps or (5 if device.type == "cpu" else 10)

    paths = {"gemm": gemm, "unfused": unfused}
    do_compile = not args.no_compile and (device.type == "cuda" or args.compile_cpu)
    if do_compile:
        paths["unfused_compiled"] = torch.compile(unfused, dynamic=False)
    paths["fused"] = fused
    if do_compile:
        paths["fused_compiled"] = torch.compile(fused, fullgraph=True, dynamic=False)

    triton_version = __import__("triton").__version__ if fs.HAS_TRITON else None
    log(f"device: {device_name(device)}; torch {torch.__version__}; triton {triton_version}")
    cases = []
    for hname, (H, V) in heads.items():
        for N in tokens:
            case = run_case(N, H, V, device, dtype, paths, reps, seed=N + H, log=log)
            case["head"] = hname
            cases.append(case)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    result = kernel_bench_report(
        "fused_scorer", device, "bench_fused_scorer.py", argv,
        epilogue_fit=epilogue_fit(cases),
        triton=triton_version,
        tiny=args.tiny,
        dtype=str(dtype),
        timing="triton.testing.do_bench median (L2 cleared between runs)" if device.type == "cuda"
        else "time.perf_counter median",
        peak_extra_bytes="torch.cuda.max_memory_allocated above the inputs, one call, outputs included",
        autotune=autotune_choices(),
        cases=cases,
    )
    if device.type == "cuda":
        result["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    log(f"wrote {write_json(kernel_bench_out(args.out, 'fused_scorer', device, '-tiny' if args.tiny else ''), result)}")

    def cell(r: dict) -> str:
        mib = "-" if r.get("peak_extra_bytes") is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        err = "-" if "max_abs_error" not in r else f"{r['max_abs_error']:.0e}"
        return f"{r['median_ms']:8.3f} {r.get('x_gemm', float('nan')):6.2f} {mib:>6} {err:>6}"

    print_path_table(cases, list(paths), {"head": 12, "N": 6}, f"{'ms':>8} {'xGEMM':>6} {'MiB':>6} {'err':>6}", 29, cell)
    return result


if __name__ == "__main__":
    main()
