"""What the learned exit costs per step, by shape: its prediction over the whole batch and one fit
on the trained rows, compiled with Inductor under CUDA graphs (as in the routed step), against
the same math eagerly; and that the compiled fit replays under CUDA graphs (no skip) and agrees
with the eager one.

    python benchmarks/exit_cost.py            # the speed run's shapes; JSON to benchmarks/runs/

Shapes: (hidden, batch rows B, trained rows k, T). FLOPs of one step: the prediction 2 B T H, the
fit's statistics 2 k T H^2 (float32), the Cholesky factorisation (H+1)^3 / 3 and its solves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, command_line, copy_to_out, device_name, device_slug, log, percentiles_ms,  # noqa: E402
                    pick_device, time_calls, versions, write_json)

# name -> (hidden, B, k, T): the speed run's shapes at ratio 0.25, and each in its full-batch warmup.
SHAPES = {
    "SmolLM-135M (16 x 1024)": (576, 16, 4, 1024),
    "SmolLM-360M (16 x 1024)": (960, 16, 4, 1024),
    "Llama-3.2-1B (8 x 1024)": (2048, 8, 2, 1024),
    "SmolLM-135M warmup (k = B = 16)": (576, 16, 16, 1024),
}


def step_fn(exit_):
    """predict over the batch, then fit on the trained rows: the exit's share of a routed step."""
    from cggr_compile.exit import FitInputs

    def step(state, hidden, idx, token_loss, weight):
        pred = exit_.predict(state, hidden)
        rows = hidden.index_select(0, idx)
        new_state, metrics = exit_.fit(state, FitInputs(rows, pred.index_select(0, idx), weight), token_loss)
        return pred, new_state, metrics["exit_r2"]

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "runs"))
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    from cggr_compile.exit import LearnedExit

    rows = []
    for name, (h, b, k, t) in SHAPES.items():
        exit_ = LearnedExit(h, 0.97, 1e-3, 4)
        gen = torch.Generator(device="cpu").manual_seed(0)
        hidden = (torch.randn(b, t, h, generator=gen) * 2).to(device, torch.bfloat16)
        idx = torch.arange(k, device=device)
        loss = (torch.rand(k, t, generator=gen) * 4).to(device)
        weight = torch.ones(k, t, device=device)
        state = exit_.state_on(device)
        eager = step_fn(exit_)
        compiled = torch.compile(eager, mode="reduce-overhead", fullgraph=True)
        # warm: compile and record; feed the state forward so the solve sees real statistics
        for _ in range(4):
            _, new_state, _ = eager(state, hidden, idx, loss, weight)
            exit_.commit(new_state)
            state = exit_.state
        for _ in range(3):
            compiled(state, hidden, idx, loss, weight)
        ref_pred, ref_state, _ = eager(state, hidden, idx, loss, weight)
        pred, new_state, _ = compiled(state, hidden, idx, loss, weight)
        w_ref, w_got = exit_.layout.weights(ref_state), exit_.layout.weights(new_state)
        rel = float((w_got - w_ref).norm() / w_ref.norm().clamp(min=1e-12))
        pred_err = float((pred - ref_pred).abs().max())
        ms_eager = percentiles_ms(time_calls(lambda i: eager(state, hidden, idx, loss, weight), args.iters, device)[0])
        ms_graph = percentiles_ms(time_calls(lambda i: compiled(state, hidden, idx, loss, weight), args.iters, device)[0])
        flops = 2 * b * t * h + 2 * k * t * (h + 1) ** 2 + (h + 1) ** 3 / 3 + 4 * (h + 1) ** 2
        row = {"shape": name, "hidden": h, "batch": b, "k": k, "seq": t, "gflop": flops / 1e9,
               "eager_ms": ms_eager["median_ms"], "compiled_cudagraphs_ms": ms_graph["median_ms"],
               "weights_rel_diff_vs_eager": rel, "prediction_max_abs_diff": pred_err}
        log(f"{name}: eager {ms_eager['median_ms']:.3f} ms, compiled+CUDA graphs {ms_graph['median_ms']:.3f} ms, "
            f"{flops / 1e9:.2f} GFLOP, weights rel diff {rel:.2e}, prediction diff {pred_err:.2e}")
        rows.append(row)
    skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    data = {"device": device_name(device), "versions": versions(), "command": command_line(__file__, argv),
            "cudagraph_skips": skips, "rows": rows}
    out = Path(args.out)
    path = write_json(out / f"exit_cost_{device_slug(device)}.json", data)
    copy_to_out([path], out)
    log(f"cudagraph skips: {skips}; wrote {path}")


if __name__ == "__main__":
    main()
