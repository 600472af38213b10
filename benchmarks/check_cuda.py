"""CUDA checks of the two entry points (run on a GPU machine; prints a short table last).

* parity: loss and every gradient of ``torch.compile(model, backend="cggr")`` (Inductor) and of
  ``torch.compile(cggr_compile.transform(model))`` against the eager transform, float32;
* no host synchronisation in a step: one step under ``torch.cuda.set_sync_debug_mode("error")``;
* compilations over a warmup schedule (levels used vs rewritten graphs built).

Usage: ``python benchmarks/check_cuda.py [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers as T

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for ``benchmarks.*``; cggr_compile must be installed (require_cggr_compile)

from benchmarks.common import require_cggr_compile  # noqa: E402

cggr_compile = require_cggr_compile()
from cggr_compile.backend import core_of  # noqa: E402


def model_and_batch(seed: int = 0, b: int = 8, t: int = 256):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=4096, initializer_range=0.2, use_cache=False)
    model = T.LlamaForCausalLM(cfg).cuda().train()
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    ids = torch.randint(0, 4096, (b, t), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    mask[1, t // 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return model, dict(input_ids=ids, attention_mask=mask, labels=labels)


OPTS = dict(router_layers=2, warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.25, scoring="loss")


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def parity(entry: str) -> dict:
    model, b = model_and_batch()
    ref = cggr_compile.transform(model, **OPTS)
    out = ref(**b)
    out.loss.backward()
    ref_loss, ref_idx, ref_g = out.loss.item(), out.selected_indices.tolist(), grads(model)
    model.zero_grad()
    if entry == "backend":
        fn = torch.compile(model, backend="cggr", options=OPTS)
        out = fn(**b)
        idx = cggr_compile.last_metrics(model)["selected_indices"].tolist()
    else:
        cg = cggr_compile.transform(model, **OPTS)
        out = torch.compile(cg)(**b)
        idx = out.selected_indices.tolist()
    out.loss.backward()
    g = grads(model)
    rel = max(((g[n] - ref_g[n]).norm() / ref_g[n].norm().clamp(min=1e-30)).item() for n in ref_g)
    return dict(entry=entry, same_rows=idx == ref_idx, loss=out.loss.item(), ref_loss=ref_loss,
                loss_abs_err=abs(out.loss.item() - ref_loss), max_rel_grad_err=rel,
                missing_grads=sorted(set(ref_g) - set(g)))


def no_sync(entry: str) -> dict:
    model, b = model_and_batch(b=16)
    opts = dict(OPTS, dynamic_threshold=True, warmup_steps=4, min_tokens_ratio=0.25, num_levels=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if entry == "backend":
        fn = torch.compile(model, backend="cggr", options=opts)
        advance = lambda: cggr_compile.step(model)  # noqa: E731
    else:
        cg = cggr_compile.transform(model, **opts)
        fn = torch.compile(cg)
        advance = cg.step
    ks, error = [], None
    for i in range(10):
        if i == 8:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", torch.bfloat16):
                out = fn(**b)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            advance()
        except RuntimeError as err:
            error = str(err).splitlines()[0]
            torch.cuda.set_sync_debug_mode(0)
            break
        finally:
            if i == 8:
                torch.cuda.set_sync_debug_mode(0)
        ks.append(out.cggr_metrics["k"] if entry == "transform" else cggr_compile.last_metrics(model)["k"])
    graphs = len(core_of(model).routed_graphs[0].compiled) if entry == "backend" else None
    return dict(entry=entry, sync_error=error, ks=ks, levels_used=len(set(ks)), rewritten_graphs=graphs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=T.__version__,
                command=" ".join(sys.argv))
    rows = []
    for entry in ("backend", "transform"):
        t0 = time.time()
        rows.append(dict(parity(entry), seconds=round(time.time() - t0, 1)))
        torch._dynamo.reset()
        rows.append(no_sync(entry))
        torch._dynamo.reset()
    result = dict(info, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(info))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
