"""Training race: full batch vs a random subset vs CGGR, same weights, same data, same wall-clock.

    python benchmarks/race.py --preset tiny             # the README's main job, a few minutes on a CPU
    python benchmarks/race.py --preset smollm135m       # SmolLM-135M shape from scratch on one H100 / H200
    python benchmarks/race.py --preset smollm2-135m     # the real SmolLM2-135M-Instruct fine-tuned, one H100 / H200
    python benchmarks/race.py --preset smollm2-135m --regime pretrained-noisy --lr-sweep 1e-4,3e-4,1e-3 --seeds 0
    python benchmarks/race.py --preset tiny --regime finetune
    python benchmarks/race.py --preset tiny --regime finetune-mixed --modes full,random,cggr-loss,cggr-loss-importance,cggr-excess
    python benchmarks/race.py --merge a.json b.json     # one report from runs of the same race's modes

Every mode starts from the same weights, reads the same batches and trains for the same seconds of
step time; they are judged by the full model's held-out loss. The method is in ``--help``, from the
harness modules that implement it: the data and regimes (``benchmarks/harness/race_data.py``), the
modes and their step (``race_modes.py``), a run and its evaluation (``training.py``), the pretrained,
base and reference models (``references.py``), the options and presets (``race_options.py``).

Results go to ``benchmarks/runs/`` (ignored by git), so a run never dirties the checkout. The
committed results are written only when asked: ``--commit-results`` (or ``--results-dir
benchmarks/results``), which also merges the run into ``benchmarks/results/quality_summary.json``.
Files: ``<results dir>/race_<preset>[-<regime>]_<device-slug>.json`` and ``.png`` (no suffix for
scratch; ``--tag`` replaces ``<preset>[-<regime>]``). After each mode but the last, the finished modes
are also written to ``<same stem>.partial.json``, so that a run cut short keeps them.

Run it from the repository root of an installed checkout: ``python -m pip install --no-deps -e .``
(with ``--no-build-isolation`` on a machine without network, such as one that gets the code as an
unpacked tarball); the race imports the installed ``cggr_compile`` and says so when it cannot.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # for ``benchmarks.*``; cggr_compile must be installed (require_cggr_compile)

from benchmarks import common  # noqa: E402
from benchmarks.common import command_line, device_name, device_slug, require_cggr_compile, write_json  # noqa: E402
from benchmarks.harness.race_data import race_corpus, race_stream  # noqa: E402
from benchmarks.harness.race_modes import (REDUCIBLE_MODES, ModeRunner, build_model, library_default_mode,  # noqa: E402
                                           mode_lr, subset_k)
from benchmarks.harness.race_options import parse_args, settle_device  # noqa: E402
from benchmarks.harness.race_report import (RESULTS_DIR, all_in_comparison, merge_reports, plot,  # noqa: E402
                                            summary_table, update_quality_summary)
from benchmarks.harness.references import initial_weights, pretrained_for, race_reference, reference_cost  # noqa: E402
from benchmarks.harness.stats import load_avg  # noqa: E402
from benchmarks.harness.training import eval_summary, heldout_losses, sweep_mode  # noqa: E402

cggr_compile = require_cggr_compile()


def race_tag(args) -> str:
    """The race's name in its files and plot: ``--tag``, else the preset and any regime but scratch."""
    return args.tag or (args.preset + ("" if args.regime == "scratch" else "-" + args.regime))


def result_stem(args, device) -> str:
    return common.result_stem("race", race_tag(args), device_slug(device))


def main(argv=None) -> dict:
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if argv_list[:1] == ["--merge"]:  # python benchmarks/race.py --merge a.json b.json [--results-dir D]
        rest, out_dir = argv_list[1:], None
        if "--results-dir" in rest:
            i = rest.index("--results-dir")
            rest, out_dir = rest[:i] + rest[i + 2:], rest[i + 1]
        return merge_reports(rest, out_dir)
    args = parse_args(argv_list)
    t_start = time.perf_counter()
    device = settle_device(args)
    log = print
    log(f"== CGGR race: preset {args.preset}, regime {args.regime}, device {device_name(device)}, "
        f"torch {torch.__version__}, compile {args.compile}, cudagraphs {args.cudagraphs}, dtype {args.dtype}")

    # ---- the data and the weights every mode starts from
    args.ref_eval = None
    pre = pretrained_for(args, log)
    if pre:
        log(f"pretrained: {pre['id']} ({pre['info']['n_params'] / 1e6:.1f}M parameters, "
            f"{'cached' if pre['info'].get('cached') else 'made now'})")
    corpus = race_corpus(args, pre, log)
    if args.regime in ("finetune", "finetune-mixed"):
        log(f"  base packages ({len(corpus.base_packages)}): {corpus.base_packages[0]} .. {corpus.base_packages[-1]}; "
            f"race packages ({len(corpus.race_packages)}): {corpus.race_packages[0]} .. {corpus.race_packages[-1]}")
    if pre:
        log(f"tokenizer: the pretrained model's own ({corpus.tokenizer_key}), vocab {corpus.vocab_size}")
    else:
        log(f"tokenizer: vocab {corpus.vocab_size}, {corpus.tokenizer_seconds:.1f} s "
            f"({'trained now' if corpus.tokenizer_trained else 'cached'})")
    train_cpu, eval_seqs, mix_info, noise_info = race_stream(args, corpus, log)
    train = train_cpu.to(device) if device.type == "cuda" else train_cpu
    init_state, cfg, n_params, base_info = initial_weights(args, corpus, pre, device, log)
    k = subset_k(args.ratio, args.batch_size)
    log(f"model: {type(cfg).__name__.replace('Config', '')}, {n_params / 1e6:.2f}M parameters (hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv, ff "
        f"{cfg.intermediate_size}, tied {cfg.tie_word_embeddings}); "
        f"B={args.batch_size}, T={args.seq_len}, k={k} (ratio {args.ratio}), router {args.router_layers} layers")
    log(f"lr rule {args.lr_rule}: " + "; ".join(
        f"base {b:.1e}: " + ", ".join(f"{m} {mode_lr(m, args, args.batch_size if m == 'full' else k, b):.2e}"
                                      for m in args.modes) for b in args.lr_values) + f"; seeds {args.seed_values}")
    log(f"budget {args.budget_seconds:.0f} s of step time per mode (+{args.warmup_steps} uncounted warm-up steps); "
        f"held-out eval every {args.eval_every_seconds} s on {eval_seqs.shape[0]} sequences ({args.eval_pick})")

    init_model, _ = build_model(args, corpus.vocab_size)
    init_model.load_state_dict(init_state)
    init_eval = heldout_losses(init_model.to(device), eval_seqs, args.eval_batch_size or args.batch_size,
                               device, args.dtype)
    del init_model
    init_summary = eval_summary(init_eval, args.eval_n_new)
    log("initial held-out loss " + ", ".join(f"{kk} {v:.4f}" for kk, v in init_summary.items()))

    # ---- the reference model (RHO-LOSS), for the reducible modes: trained by the full mode's runner
    runners: dict[str, ModeRunner] = {}
    reference = None
    if any(m in REDUCIBLE_MODES for m in args.modes) or args.with_reference:
        runners["full"] = ModeRunner("full", init_state, args, device, corpus.vocab_size)
        reference = race_reference(args, corpus, init_state, device, runners["full"], pre["id"], eval_seqs,
                                   train_cpu, log)
        if "full" not in args.modes:
            del runners["full"]

    # ---- the race: each mode alone (compiled once, its CUDA-graph memory given back before the
    # next), every learning rate and seed of the sweep; a mode built already runs first
    results: dict[str, dict] = {}
    stem = result_stem(args, device)
    out_dir = Path(args.results_dir)
    for mode in [m for m in args.modes if m in runners] + [m for m in args.modes if m not in runners]:
        runner = runners.pop(mode, None) or ModeRunner(mode, init_state, args, device, corpus.vocab_size)
        results[mode] = sweep_mode(mode, runner, init_state, train, eval_seqs, init_eval, args, device,
                                   corpus.vocab_size, log, ref_loss=reference and reference["loss"])
        del runner
        if args.compile:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            results[mode]["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        if len(results) < len(args.modes):  # a run cut short (a machine's time limit) keeps its finished modes
            write_json(out_dir / f"{stem}.partial.json",
                       dict(argv=argv_list, initial_heldout_loss=init_summary["heldout_loss"], k=k,
                            summary_table=summary_table(results), modes=results))

    # ---- the report
    results = {m: results[m] for m in args.modes}
    table = summary_table(results)
    total = time.perf_counter() - t_start
    print(f"\n{table}\n\ntotal run time {total:.1f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.partial.json").unlink(missing_ok=True)
    all_in = None
    if reference is not None:
        ref_cost = reference_cost(reference["info"], reference["scoring"])
        all_in = all_in_comparison(results, ref_cost, args.budget_seconds)
        all_in["note"] = ("the reducible modes charged the reference model's fine-tuning (every step at its "
                          "measured step time; the compile is not charged) and its offline scoring of the training "
                          "stream; made once, it serves every run, lr and seed of this process (and later ones, cached)")
        print("\nall-in (reference cost charged to the reducible modes, "
              f"{ref_cost:.1f} s): " + ", ".join(f"{m} {v['heldout_all_in']:.4f}" for m, v in all_in["modes"].items()))
    import transformers

    cfg_dict = {kk: v for kk, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
    args.hf_config = args.ref_eval = None  # not JSON
    report = dict(
        preset=args.preset, regime=args.regime, device=device.type, device_name=device_name(device),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), load_avg_end=load_avg(),
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        cggr_compile=getattr(cggr_compile, "__version__", "unknown"),
        started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=command_line("race.py", argv_list),
        argv=argv_list, args=dict(vars(args)), total_seconds=round(total, 2),
        model=dict(n_params=n_params, config=cfg_dict), corpus=corpus.describe(), base=base_info,
        k=k, lr_rule=args.lr_rule, initial_heldout_loss=init_summary["heldout_loss"],
        initial_heldout=init_summary, mix=mix_info,
        pretrained=pre["info"] if pre else None, noise=noise_info,
        reference=reference and reference["info"], reference_scoring=reference and reference["scoring"],
        reference_losses=reference and reference["summary"], all_in=all_in,
        default_mode=library_default_mode(), lr_values=args.lr_values, seeds=args.seed_values,
        sweep={m: r["sweep"] for m, r in results.items()}, modes=results, summary_table=table,
    )
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    report["json_name"] = json_path.name
    write_json(json_path, report)
    plot(results, png_path, f"CGGR race, preset {race_tag(args)}, {device_name(device)}, {n_params / 1e6:.1f}M params, "
                            f"B={args.batch_size} k={k}, {args.budget_seconds:.0f} s/mode, lr rule {args.lr_rule}")
    print(f"wrote {json_path} and {png_path.name}")
    if out_dir.resolve() == RESULTS_DIR.resolve():
        print(f"updated {update_quality_summary(report, RESULTS_DIR / 'quality_summary.json')}")
    report["json_path"], report["png_path"] = str(json_path), str(png_path)
    return report


if __name__ == "__main__":
    main()
