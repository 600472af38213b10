"""Data-parallel throughput: CGGR under DDP on N GPUs of one host against one GPU and against DDP of
the compiled full batch.

    python benchmarks/ddp_speed.py --model smollm360m --worlds 1 2            # 2 GPUs of one host
    python benchmarks/ddp_speed.py --preset tiny                               # the CPU check (gloo)
    python benchmarks/ddp_speed.py --merge a.json b.json --name both           # one table from several runs

Each world size runs in its own group of processes (spawned here, NCCL on CUDA with
``NCCL_NVLS_ENABLE=0``, gloo on the CPU). World 1 is plain single-device training (no DDP wrapper);
larger worlds wrap the model in ``DistributedDataParallel`` with its default bucketing. Modes:

* ``compiled``: ``torch.compile(DDP(model))``, the full per-rank batch (the usual DDP + compile);
* ``cggr_transform``: ``torch.compile(DDP(cggr_compile.transform(model)))`` with DDP's default
  ``optimize_ddp`` graph splitting (the rewrite is in the module, so it survives the split, and the
  gradient all-reduce still overlaps the backward bucket by bucket);
* ``cggr_backend``: ``torch.compile(DDP(model), backend="cggr")`` with
  ``torch._dynamo.config.optimize_ddp = False`` (the backend must see the whole graph; it then cuts
  the rewritten step at DDP's buckets itself, so the all-reduces overlap the backward here too).

Every rank trains ``B`` rows per step (CGGR: its own ``k`` hardest of them); every selected token
weighs the same across ranks (``data_parallel_normalize``). Throughput = world · B · T / step time
(the slowest rank's median by CUDA events). Output: ``benchmarks/results/ddp_<name>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for ``benchmarks.*``; cggr_compile must be installed (require_cggr_compile)

from benchmarks.common import (SHAPES, adamw, build_llama, command_line, device_name, device_slug,  # noqa: E402
                               profile_steps, random_batches, require_cggr_compile, result_stem, rows_for,
                               step_timing_options, sync, time_calls, write_report)

MODES = ("compiled", "cggr_transform", "cggr_backend")
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(model="smollm360m", worlds=[1, 2], modes=list(MODES), warmup=8, steps=20),
    "tiny": dict(model="tiny", worlds=[1, 2], modes=list(MODES), warmup=2, steps=3),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_fn(mode: str, model: torch.nn.Module, world: int, args: argparse.Namespace, device: torch.device):
    """(step(batch) -> loss, optimizer, cggr module or None) for one mode."""
    import cggr_compile

    opts = dict(min_tokens_ratio=args.ratio, router_layers=args.router_layers, warmup_steps=0,
                dynamic_threshold=False, scoring=args.scoring)
    cg = None
    net: torch.nn.Module = model
    torch._dynamo.config.optimize_ddp = mode != "cggr_backend"
    if mode == "cggr_transform":
        cg = cggr_compile.transform(model, **opts)
        net = cg
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                        bucket_cap_mb=args.bucket_cap_mb,
                                                        gradient_as_bucket_view=args.bucket_view)
        if args.comm_hook == "bf16":  # all-reduce the gradients in bf16: half the bytes
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            net.register_comm_hook(None, default_hooks.bf16_compress_hook)
    backend = "cggr" if mode == "cggr_backend" else ("inductor" if device.type == "cuda" else "eager")
    graphs = args.cudagraphs and device.type == "cuda"
    if mode == "cggr_backend":
        compiled = torch.compile(net, backend=backend, options=dict(opts, cudagraphs=graphs))
    else:
        compiled = torch.compile(net, backend=backend, **({"mode": "reduce-overhead"} if graphs else {}))
    opt = adamw(model, device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step(b: dict) -> torch.Tensor:
        with autocast:
            out = compiled(**b)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt, (cg if cg is not None else (model if mode == "cggr_backend" else None))


def _run_mode(mode: str, rank: int, world: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import cggr_compile

    shape = dict(SHAPES[args.model])
    batch, seq = args.batch or shape["batch"], args.seq or shape["seq"]
    rec: dict[str, Any] = dict(mode=mode, world=world, batch_per_rank=batch, seq=seq, status="ok",
                               k=batch if mode == "compiled" else rows_for(args.ratio, batch))
    torch._dynamo.reset()
    model = build_llama(shape, device)
    batches = random_batches(shape, batch, seq, device, n=4)
    # every rank its own data: shift the token ids by rank (same distribution, other rows)
    for b in batches:
        b["input_ids"] = (b["input_ids"] + 7919 * rank) % shape["vocab"]
        b["labels"] = b["input_ids"].clone()
    step, opt, cg = _step_fn(mode, model, world, args, device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync(device)
    rec["warmup_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = time_calls(lambda i: step(batches[i % len(batches)]), args.steps, device)
    if device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    rec["median_ms"] = statistics.median(times)
    rec["last_loss"] = float(loss)
    if cg is not None:
        m = cg.metrics() if hasattr(cg, "metrics") else cggr_compile.last_metrics(cg)
        rec["k_observed"] = m.get("k")
        if rec["k_observed"] != rec["k"]:
            rec["status"] = "not_routed"
    if args.profile and device.type == "cuda":
        rec["profile"] = profile_steps(step, batches, device)
    if device.type == "cuda":
        try:
            torch.cuda.set_sync_debug_mode("error")
            step(batches[0])
            rec["host_sync"] = False
        except Exception as err:  # noqa: BLE001
            rec["host_sync"] = f"{type(err).__name__}: {str(err)[:300]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return rec


def _allreduce_rate(device: torch.device, numel: int = 90_000_000) -> dict[str, Any]:
    """The interconnect's all-reduce rate on this host: a 360 MB fp32 tensor, median of 5 (bus GB/s as
    nccl-tests counts it: 2 (n - 1) / n of the bytes cross a link)."""
    x = torch.ones(numel, device=device)
    times = []
    for _ in range(6):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dist.all_reduce(x)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times[1:])
    n = dist.get_world_size()
    return dict(mode="allreduce_probe", world=n, status="ok", bytes=numel * 4, median_ms=med * 1e3,
                bus_gbps=numel * 4 * 2 * (n - 1) / n / med / 1e9, median_ms_slowest_rank=med * 1e3)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                **({"device_id": device} if cuda else {}))
    records = []
    try:
        if world > 1 and cuda:
            records.append(_allreduce_rate(device))
        for mode in args.modes:
            try:
                rec = _run_mode(mode, rank, world, args, device)
            except Exception as err:  # noqa: BLE001
                rec = dict(mode=mode, world=world, status="error", error=f"{type(err).__name__}: {str(err)[:800]}",
                           traceback=traceback.format_exc()[-2000:])
            if world > 1:  # the step of a data-parallel job is its slowest rank's
                t = torch.tensor([rec.get("median_ms", float("nan"))], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                rec["median_ms_slowest_rank"] = float(t)
            else:
                rec["median_ms_slowest_rank"] = rec.get("median_ms")
            records.append(rec)
            if cuda:
                torch.cuda.empty_cache()
            if rank == 0:
                print(f"# world {world} {mode}: {rec.get('median_ms_slowest_rank')} ms {rec['status']} "
                      f"{rec.get('error', '')[:300]}", flush=True)
                pr = rec.get("profile") or {}
                if "wall_ms" in pr:
                    print(f"#   profile: wall {pr['wall_ms']:.1f} ms, host {pr['host_ms']:.1f} ms, kernels "
                          f"{pr['gpu_busy_ms']:.1f} ms in {pr['kernels_per_step']:.0f}; top: " +
                          "; ".join(f"{k['name'][:60]} {k['ms_per_step']:.2f}" for k in pr["top_kernels"][:10]), flush=True)
    finally:
        if rank == 0:
            Path(out_file).write_text(json.dumps(records))
        if world > 1:
            # Leave without tearing the process group down. NCCL's teardown after CUDA-graph replays hung
            # the run (H200, torch 2.11, twice); gloo's aborted a rank whose peer had already left ("terminate
            # called without an active exception", CI, 2 cores). The records are written; the barrier makes
            # sure no rank is still inside a collective when the other exits.
            if cuda:
                torch.cuda.synchronize(device)
            else:
                dist.barrier()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def markdown(meta: dict, records: list[dict]) -> str:
    L = [f"# Data parallel: {meta['model']} on {meta['device_name']}", "",
         f"torch {meta['torch']}, transformers {meta['transformers']}; command: `{meta['command']}`", "",
         f"Per rank: {meta['batch']}×{meta['seq']} rows, ratio {meta['ratio']}, router {meta['router_layers']} layers, "
         f"bf16 autocast, fused AdamW in the step, {meta['warmup']} warm-up + {meta['steps']} timed steps, DDP buckets of {meta.get('bucket_cap_mb', 25)} MB"
         f"{' (gradient_as_bucket_view)' if meta.get('bucket_view') else ''}"
         f"{'; CUDA graphs in the compiled graphs' if meta.get('cudagraphs') else ''}. "
         "Step = slowest rank's median (CUDA events). Throughput = world·B·T / step. "
         "Scaling = throughput / the same mode's throughput on one device.", "",
         "| mode | world | step ms | tok/s | scaling vs 1 device | × DDP compiled full batch | k | peak GiB | sync | status |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["mode"] == "allreduce_probe":
            L.insert(5, f"Interconnect: all-reduce of {r['bytes'] / 1e6:.0f} MB fp32 over {r['world']} GPUs in "
                        f"{r['median_ms']:.1f} ms, {r['bus_gbps']:.0f} GB/s bus bandwidth. DDP comm hook: {meta.get('comm_hook')}.")
            L.insert(6, "")
    records = [r for r in records if r["mode"] != "allreduce_probe"]
    by = {(r["mode"], r["world"]): r for r in records}
    for r in records:
        ms = r.get("median_ms_slowest_rank")
        tput = r["world"] * meta["batch"] * meta["seq"] / (ms * 1e-3) if ms else None
        one = by.get((r["mode"], 1), {}).get("median_ms_slowest_rank")
        scaling = (tput / (meta["batch"] * meta["seq"] / (one * 1e-3))) if tput and one else None
        full = by.get(("compiled", r["world"]), {}).get("median_ms_slowest_rank")
        vs_full = full / ms if full and ms else None
        f = lambda x, s=".1f": "–" if x is None else format(x, s)  # noqa: E731
        L.append(f"| {r['mode']} | {r['world']} | {f(ms)} | {f(tput, ',.0f')} | {f(scaling, '.2f')} | "
                 f"{f(vs_full, '.2f')} | {r.get('k', '–')} | {f(r.get('peak_mem_gib'), '.2f')} | "
                 f"{'no' if r.get('host_sync') is False else r.get('host_sync', '–')} | {r['status']} {r.get('error', '')[:120]} |")
    return "\n".join(L) + "\n"


def merge(args: argparse.Namespace) -> int:
    runs = [json.loads(Path(f).read_text()) for f in args.merge]
    meta = dict(runs[0]["meta"], command=" ; ".join(r["meta"]["command"] for r in runs),
                merged_from=[Path(f).name for f in args.merge])
    records = [rec for r in runs for rec in r["records"]]
    stem = result_stem("ddp", args.name or "merged", Path(args.merge[0]).stem.rsplit("_", 1)[-1])
    print(write_outputs(Path(args.out_dir), stem, meta, records))
    return 0


def write_outputs(out_dir: Path, stem: str, meta: dict, records: list[dict]) -> str:
    """``<stem>.json`` (meta and records) and ``<stem>.md`` (the table); returns the table."""
    md = markdown(meta, records)
    write_report(out_dir, stem, dict(meta=meta, records=records), md)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    p.add_argument("--model")
    p.add_argument("--worlds", nargs="+", type=int)
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--router-layers", type=int, default=4)
    p.add_argument("--scoring", default="entropy")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0,
                   help="DDP's bucket size; with graph splitting also the size of each compiled fragment")
    p.add_argument("--comm-hook", choices=("none", "bf16"), default="none",
                   help="DDP comm hook: bf16 compresses the gradient all-reduce to half the bytes")
    p.add_argument("--bucket-view", action="store_true",
                   help="DDP gradient_as_bucket_view: the gradients live in the buckets (no copy in and out)")
    step_timing_options(p, device_help="cpu forces gloo on the CPU",
                        cudagraphs_help="CUDA graphs for the compiled graphs (reduce-overhead; cggr: cudagraphs=True); "
                                        "the DDP reducer and its all-reduces stay outside the graphs",
                        merge_help="merge these runs' JSON (same host and options, e.g. run side by side on other "
                                   "GPUs) into one report")
    p.add_argument("--world-timeout-s", type=float, default=900.0,
                   help="kill a world's processes after this long and go on to the next world")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    for key, val in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
    if args.preset == "tiny":
        args.router_layers = min(args.router_layers, 1)
    import transformers

    require_cggr_compile()  # before spawning: says what to run when the package is not installed

    cuda = torch.cuda.is_available() and args.device != "cpu"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda and max(args.worlds) > torch.cuda.device_count():
        raise SystemExit(f"--worlds {max(args.worlds)} needs that many GPUs; this host has {torch.cuda.device_count()}")
    shape = SHAPES[args.model]
    meta = dict(model=args.model, device_name=device_name(dev), torch=torch.__version__, transformers=transformers.__version__,
                command=command_line("ddp_speed.py", argv), batch=args.batch or shape["batch"], seq=args.seq or shape["seq"],
                ratio=args.ratio, router_layers=args.router_layers, warmup=args.warmup, steps=args.steps,
                gpus=torch.cuda.device_count() if cuda else 0, comm_hook=args.comm_hook, bucket_cap_mb=args.bucket_cap_mb,
                bucket_view=args.bucket_view, cudagraphs=args.cudagraphs, nccl_nvls_enable="0", started=time.strftime("%Y-%m-%d %H:%M:%S"))
    records: list[dict] = []
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem("ddp", args.name or f"{args.preset}-{args.model}", device_slug(dev))
    for world in args.worlds:
        tmp = out_dir / f".{stem}_world{world}.json"
        print(f"# world {world}: starting", flush=True)
        ctx = mp.start_processes(_worker, args=(world, _free_port(), args, str(tmp)), nprocs=world,
                                 start_method="spawn", join=False)
        deadline = time.monotonic() + args.world_timeout_s
        while True:
            try:
                if ctx.join(timeout=5):
                    break
            except mp.ProcessExitedException as err:  # a rank that died after rank 0 wrote the records loses nothing
                print(f"# world {world}: {err}", flush=True)
                break
            if time.monotonic() > deadline:  # keep what the ranks wrote; a hung world must not stop the next
                for proc in ctx.processes:
                    proc.kill()
                print(f"# world {world}: killed after {args.world_timeout_s:.0f} s", flush=True)
                break
        if tmp.exists():
            records += json.loads(tmp.read_text())
            tmp.unlink()
        else:
            records.append(dict(mode="world", world=world, status="error", error="no records: the ranks did not finish"))
        md = write_outputs(out_dir, stem, meta, records)  # after every world: a later hang keeps this one
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
