"""How hard each kind of row of the race's noisy stream is to the model as it trains, and whether the
router sees it.

    python benchmarks/noise_difficulty.py                      # the README's main job's stream (tiny, scratch)
    python benchmarks/noise_difficulty.py --regime finetune    # the same stream, from the finetune base model
    python benchmarks/noise_difficulty.py --mode default       # trained by the library's default; its router's scores too
    python benchmarks/noise_difficulty.py --preset smollm2-135m --regime pretrained-noisy --mode default   # one GPU

Loss truncation can only skip noise that the model finds harder than the text, and that its router
predicts to be. This trains one race mode (``--mode``, default ``full``) on the race's stream
(``--preset tiny``, 25 % noise rows by default; every race option is accepted) and, every ``--every``
steps, prints the mean loss of fixed samples of each kind of row: clean text (with its 75th and 95th
percentiles), token-shuffled text and base64 / hex dumps; for a CGGR mode also the router's score of
the same rows, as it selects (``sequence_difficulty``). Results go to ``benchmarks/runs/``
(``--commit-results``: ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.common import command_line, device_slug, result_stem, write_json  # noqa: E402
from benchmarks.harness.race_data import race_corpus, race_stream  # noqa: E402
from benchmarks.harness.race_modes import ModeRunner, library_default_mode, mode_lr, subset_k  # noqa: E402
from benchmarks.harness.race_options import parse_args, settle_device  # noqa: E402
from benchmarks.harness.references import initial_weights, pretrained_for  # noqa: E402
from benchmarks.harness.training import BatchOrder, heldout_losses, router_scores  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--mode", default="full", help="the race mode that trains (default: the name of the library's)")
    own.add_argument("--steps", type=int, default=600, help="optimizer steps")
    own.add_argument("--every", type=int, default=150, help="measure every this many steps")
    own.add_argument("--sample", type=int, default=64, help="clean rows measured (half as many of each noise kind)")
    mine, rest = own.parse_known_args(argv)
    args = parse_args(["--preset", "tiny", "--noise-fraction", "0.25", "--no-progress"] + rest)
    if args.noise_fraction <= 0 or args.noise_kind != "unlearnable":
        raise SystemExit("noise_difficulty.py measures the unlearnable noise: give --noise-fraction > 0")
    device = settle_device(args)
    pre = pretrained_for(args)  # the real SmolLM2 (or --model FOLDER) in the pretrained regimes
    corpus = race_corpus(args, pre, log=lambda *a: None)
    train, _, _, noise = race_stream(args, corpus, log=print)
    state, _, _, _ = initial_weights(args, corpus, pre, device, log=print)
    mode = library_default_mode() if mine.mode == "default" else mine.mode
    runner = ModeRunner(mode, state, args, device, corpus.vocab_size)
    k = args.batch_size if mode == "full" else subset_k(args.ratio, args.batch_size)
    lr = mode_lr(mode, args, k)
    runner.reset(state, lr, args.seed)

    # fixed samples of each kind: rows [0, n_clean) are clean, then token-shuffled, then dumps
    n_clean, n_shuffled = args.n_clean_train, noise["token_shuffled"]
    g = torch.Generator().manual_seed(args.seed + 1)
    kinds = {"clean": torch.randperm(n_clean, generator=g)[:mine.sample],
             "token_shuffled": n_clean + torch.randperm(n_shuffled, generator=g)[:mine.sample // 2],
             "dumps": n_clean + n_shuffled + torch.randperm(train.shape[0] - n_clean - n_shuffled,
                                                             generator=g)[:mine.sample // 2]}
    order = BatchOrder(train.shape[0], args.batch_size, args.seed)
    rows = []
    for s in range(mine.steps + 1):
        if s % mine.every == 0:
            loss = {n: heldout_losses(runner.model, train[idx], args.batch_size, device, args.dtype)
                    for n, idx in kinds.items()}
            row = dict(step=s, **{n: round(float(v.mean()), 4) for n, v in loss.items()},
                       clean_q75=round(float(loss["clean"].quantile(0.75)), 4),
                       clean_q95=round(float(loss["clean"].quantile(0.95)), 4))
            line = (f"step {s}: loss clean {row['clean']:.3f} (q75 {row['clean_q75']:.3f}, q95 {row['clean_q95']:.3f}), "
                    f"token-shuffled {row['token_shuffled']:.3f}, dumps {row['dumps']:.3f}")
            if runner.cg is not None:  # what the router predicts for the same rows, as it selects now
                score = {n: router_scores(runner.cg, train[idx], args.batch_size, device, args.dtype)
                         for n, idx in kinds.items()}
                row["router"] = {n: round(float(v.mean()), 4) for n, v in score.items()}
                row["router"]["clean_q95"] = round(float(score["clean"].quantile(0.95)), 4)
                line += "; router " + ", ".join(f"{n} {v:.3f}" for n, v in row["router"].items())
            rows.append(row)
            print(line, flush=True)
        if s < mine.steps:
            runner.step(train[order.next()].to(device), None, k)
    tag = args.tag or "-".join([args.preset, args.regime] + ([] if mine.mode == "full" else [mine.mode]))
    path = Path(args.results_dir) / f"{result_stem('noise_difficulty', tag, device_slug(device))}.json"
    report = dict(command=command_line("noise_difficulty.py", argv), regime=args.regime, preset=args.preset, mode=mode,
                  torch=torch.__version__, noise=noise, samples={n: int(v.numel()) for n, v in kinds.items()},
                  batch_size=args.batch_size, k=k, lr=lr, rows=rows)
    write_json(path, report)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
