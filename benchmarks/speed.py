"""Canonical side-by-side speed benchmark: one command, one process, every mode on the same model.

    python benchmarks/speed.py                       # 3 shapes, ratio 0.25, router 4 (one H100 / H200)
    python benchmarks/speed.py --preset tiny         # CPU check of the script (< 60 s), not figures
    python benchmarks/speed.py --models smollm135m --ratios 0.1 0.25 0.5 --router-layers 2 4
    python benchmarks/speed.py --merge a.json b.json # one table from several runs' JSON

The experiment: for each shape, ratio and router depth, every mode (``eager``, ``compiled``,
``compiled_fused_loss`` with ``--fused-loss``, ``random_subset``, ``router_only``, ``cggr_backend``,
``cggr_transform``) runs on a fresh, identically seeded model of that shape, each in its own empty
compile cache, and its median step time (p10 / p90), tokens/s, peak memory, cold compile time,
compilations and host syncs are recorded; then, for the CGGR modes, the compilations over a warmup
schedule. Before measuring, the device's ceilings and each shape's predicted FLOPs and bytes are
printed. The report gives each mode's speedup over ``compiled`` and each CGGR mode's gap to
``random_subset + router_only``, the best a sequence-level CGGR step can do.
``benchmarks/harness/step_timing.py`` says what each mode runs and how it is timed and counted;
``benchmarks/harness/speed_report.py`` what the report derives.

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
    # Must be set before torch is imported (by this file or the harness it imports below).
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for ``benchmarks.*``; cggr_compile must be installed (require_cggr_compile)

import torch  # noqa: E402

from benchmarks.common import (SHAPES, command_line, device_name, device_slug, log, pick_device,  # noqa: E402
                               require_cggr_compile, result_stem, rows_for, step_timing_options, versions)
from benchmarks.harness.speed_report import (merge, prediction_lines, record_lines, schedule_line,  # noqa: E402
                                             write_outputs)
from benchmarks.harness.step_timing import (ALL_MODES, CGGR_MODES, FULL_BATCH_MODES, Ctx, fresh_caches,  # noqa: E402
                                            measure_ceilings, mode_record, predict, run_mode, run_schedule)

# compiled_fused_loss runs by default only with --fused-loss (the other modes always)
DEFAULT_MODES = tuple(m for m in ALL_MODES if m != "compiled_fused_loss")

# Every key can be overridden on the command line.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(models=["smollm135m", "smollm360m", "llama1b"], ratios=[0.25], router_layers=[4],
                steps=20, warmup=10, schedule="first", schedule_warmup=8, schedule_steps=12,
                time_budget=480.0),
    # The CPU check of the script: a shorter schedule (warmup 2: k = 8, 6, 2, 2) keeps it under a minute.
    "tiny": dict(models=["tiny"], ratios=[0.25], router_layers=[1], steps=5, warmup=2,
                 schedule="first", schedule_warmup=2, schedule_steps=4, time_budget=0.0, threads=1),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The options, a preset's values filling the ones not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES))
    p.add_argument("--ratios", nargs="+", type=float)
    p.add_argument("--router-layers", nargs="+", type=int)
    p.add_argument("--modes", nargs="+", choices=ALL_MODES)
    p.add_argument("--scoring", default=None, help="the CGGR modes' scoring (default: the library's)")
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
    p.add_argument("--no-png", action="store_true")
    step_timing_options(p, device_help="cuda or cpu (default: cuda when available)",
                        cudagraphs_help="CUDA graphs in every compiled mode: mode='reduce-overhead' for Inductor, "
                                        "options cudagraphs=True for the cggr backend",
                        merge_help="merge these JSON results into one report and exit")
    p.add_argument("--skip-ceilings", action="store_true")
    p.add_argument("--fused-loss", action="store_true",
                   help="add the mode compiled_fused_loss (the full batch, its loss by the fused head + "
                        "cross-entropy of cggr_compile.ops.fused_linear_ce: what the fusion alone buys) and "
                        "run random_subset and the CGGR modes with the fused loss too")
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



def main(argv: Optional[list[str]] = None) -> int:
    """The experiment (or, with ``--merge``, one report from several runs)."""
    args = parse_args(argv)
    if args.merge:
        print(merge(args.merge, args.name if args.name != args.preset else "merged", Path(args.out_dir),
                    png=not args.no_png))
        return 0
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda" and args.tf32:
        torch.set_float32_matmul_precision("high")
    ctx = Ctx(args, device)
    meta = describe_run(args, argv, device)
    stem = result_stem("speed", args.name, meta["device_slug"])
    out_dir = Path(args.out_dir)
    records: list[dict] = []
    schedules: list[dict] = []
    predictions: list[dict] = []

    # ---- the device's ceilings and the work each configuration must do at least, before any measurement
    ceilings: dict[str, float] = {}
    if device.type == "cuda" and not args.skip_ceilings:
        try:
            ceilings = measure_ceilings(device)
            log(f"# ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s")
        except Exception as err:  # noqa: BLE001
            log(f"# ceilings not measured: {err}")
    meta["ceilings"] = ceilings
    log("\n# predicted work per step (forward+backward = 3 x forward; attention causal; embedding gather free)")
    for name in args.models:
        sh = shape_of(args, name)
        for ratio in args.ratios:
            for rl in args.router_layers:
                try:
                    p = predict(sh, sh["batch"], sh["seq"], rows_for(ratio, sh["batch"]), rl, ceilings)
                except Exception as err:  # noqa: BLE001
                    log(f"#   {name}: prediction failed: {err}")
                    continue
                p.update(model=name, ratio=ratio, router_layers=rl)
                predictions.append(p)
                for line in prediction_lines(name, sh, p):
                    log(line)

    # ---- every mode of every shape / ratio / router, each in a fresh compile cache; the report after each
    longest = 0.0  # the longest mode so far: what the time budget expects the next one to take
    budget = args.time_budget or 0.0

    def over_budget(estimate: float) -> bool:
        return budget > 0 and time.perf_counter() - t_start + estimate > budget

    for mode, name, ratio, rl in modes_to_run(args):
        sh = shape_of(args, name)
        if over_budget(longest):
            rec = mode_record(mode, name, sh["batch"], sh["seq"], ratio, rl, status="skipped",
                              error=f"skipped: time budget {budget:.0f} s (elapsed {time.perf_counter() - t_start:.0f} s, "
                                    f"longest mode so far {longest:.0f} s)")
        else:
            log(f"\n# {name} {mode} ratio={ratio:g} router={rl} (elapsed {time.perf_counter() - t_start:.0f} s)")
            with fresh_caches(args):
                rec = run_mode(mode, name, sh, ratio, rl, ctx, sh["batch"], sh["seq"])
            longest = max(longest, rec.get("mode_wall_s", 0.0))
        for line in record_lines(rec):
            log(line)
        records.append(rec)
        write_outputs(out_dir, stem, meta, records, schedules, predictions, png=False)

    # ---- the CGGR modes' compilations over a warmup schedule
    for mode, name, ratio, rl in schedules_to_run(args):
        sh = shape_of(args, name)
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
            log(schedule_line(s))
            schedules.append(s)
        write_outputs(out_dir, stem, meta, records, schedules, predictions, png=False)

    # ---- the report: JSON, markdown (printed last) and the plot
    meta["total_wall_s"] = time.perf_counter() - t_start
    md = write_outputs(out_dir, stem, meta, records, schedules, predictions, png=not args.no_png)
    log(f"\n# wrote {out_dir / stem}.{{json,md{',png' if not args.no_png and 'png' not in meta else ''}}} "
        f"in {meta['total_wall_s']:.0f} s\n")
    print(md, flush=True)
    return 0


# ------------------------------------------------------------------------------- the run's configuration
def shape_of(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The Llama shape ``name`` with the command line's batch and sequence length, if given."""
    s = dict(SHAPES[name])
    if args.batch:
        s["batch"] = args.batch
    if args.seq:
        s["seq"] = args.seq
    return s


def modes_to_run(args: argparse.Namespace) -> list[tuple[str, str, float, int]]:
    """``(mode, shape, ratio, router_layers)`` in priority order (shape, ratio, router, mode), each
    measured once: a full-batch mode does not depend on the ratio or the router, random_subset not on
    the router, router_only not on the ratio."""
    todo: list[tuple[str, str, float, int]] = []
    if args.schedule == "only":
        return todo
    seen: set = set()
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
    return todo


def schedules_to_run(args: argparse.Namespace) -> list[tuple[str, str, float, int]]:
    """The schedule runs: each CGGR mode asked for, on the first shape (``--schedule first`` / ``only``)
    or on every one (``all``), at the first ratio and router depth."""
    sched: list[tuple[str, str, float, int]] = []
    if args.schedule == "none":
        return sched
    names = args.models[:1] if args.schedule in ("first", "only") else args.models
    for name in names:
        for mode in CGGR_MODES:
            if mode in args.modes:
                sched.append((mode, name, args.ratios[0], args.router_layers[0]))
    return sched


def describe_run(args: argparse.Namespace, argv: Optional[list[str]], device: torch.device) -> dict[str, Any]:
    """The run's meta (device, versions, command, settings), logged as the run's header."""
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
    return meta


if __name__ == "__main__":
    sys.exit(main())
