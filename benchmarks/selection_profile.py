"""What the router's selection picks from the race's training stream.

    python benchmarks/selection_profile.py --preset smollm2-135m --regime pretrained-noisy --batches 16

The race's corpus, tokenizer, noise mix, batch size and first batches (``race.py``'s options and its
``BatchOrder`` for ``--seed``); the pretrained model's router (its first ``--router-layers`` layers,
final norm and head, as ``scoring="loss"`` runs it) scores every row of each batch by its mean loss.
Then, per batch, what each rule takes: top-k (the ``k`` highest rows), importance sampling (row ``i``
is drawn ``k p_i`` times in expectation, ``cggr_compile.scoring.importance_probabilities`` with the
default floor) and a random subset (``k / B`` each). Rows are told apart by where most of their
tokens come from: the standard library's or the installed packages' Python sources, documentation,
or (noisy regime) token-shuffled text or a hex / base64 dump of a binary file. The table gives each
kind's share of the stream and of each rule's rows, and its rows' mean router loss: what top-k
trains on instead of the stream, and how the router's score ranks the rows against the whole
model's own loss (``--model-loss-batches`` of the batches). ``--depths`` compares routers of other
depths with the whole model on a few clean rows. JSON goes to ``--results-dir`` (``benchmarks/runs`` by
default).

``--finetune-steps N`` measures instead whether the library's learned exit (``scoring="predicted"``,
``cggr_compile/exit.py``) ranks rows like the whole model (issue 26's agreement target):

    python benchmarks/selection_profile.py --preset smollm2-135m --regime pretrained --finetune-steps 50 --batch-size 8 --seq-len 128 --heldout-batches 16 --threads 1

The model trains ``N`` AdamW steps through ``cggr_compile.transform(model, scoring="predicted",
router_layers=--router-layers)``, the library's defaults otherwise (``--exit-decay`` overrides that one
option), at the race's learning rate, warm-up, weight decay and clipping, on the first ``N`` batches of
the race's stream for ``--seed``. With the default ``warmup_steps=1000`` every one of those steps has
``k = B`` (the curriculum's first level), so the exit fits on every step, on the rows the step draws:
importance sampling draws ``k = B`` rows, with repeats once the exit ranks (each row ``k p`` times in
expectation, weighted ``1 / (k p)``), so a step may train fewer than ``B`` distinct rows (counted per
step). Then the next ``--heldout-batches`` batches of the same stream (never
trained on) are scored per row three ways, all with the fine-tuned weights: the exit's predicted loss
(``sequence_difficulty``), the head router's loss (the first ``--router-layers`` layers through the
model's final norm and head, ``scoring="loss"``) and the whole model's own mean next-token loss (eval
mode, no grad). The report gives each score's Spearman correlation with the whole model's loss over the
clean rows, per held-out batch and pooled, and over the noise rows in the noisy regime.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cggr_compile  # noqa: E402
from cggr_compile.exit import EXIT_METRIC_KEYS  # noqa: E402
from cggr_compile.scoring import importance_probabilities  # noqa: E402
from benchmarks import common, corpus as corpus_mod  # noqa: E402
from benchmarks.harness.race_data import mix_noise, race_corpus  # noqa: E402
from benchmarks.harness.race_modes import autocast_ctx, build_model, make_optimizer, subset_k, token_nll  # noqa: E402
from benchmarks.harness.race_options import PRESETS, parse_args  # noqa: E402
from benchmarks.harness.references import pretrained_for  # noqa: E402
from benchmarks.harness.stats import spearman  # noqa: E402
from benchmarks.harness.training import BatchOrder, heldout_losses, router_scores  # noqa: E402

NOISE_SHUFFLED, NOISE_BINARY = "noise: token-shuffled text", "noise: hex / base64 of a binary"


def file_kind(key: str) -> str:
    """A source file's kind from its corpus key (``<root label>/<relative path>``; the labels of
    ``corpus.scan_files``: ``stdlib``, ``purelib``, then the documentation roots)."""
    root = key.split("/", 1)[0]
    if not key.endswith(".py"):
        return "docs and other text"
    return {"stdlib": "stdlib .py", "purelib": "site-packages .py"}.get(root, ".py elsewhere")


def row_kinds(corpus, train: torch.Tensor, n_clean: int, noise_info: dict | None) -> list[str]:
    """The kind of each training row: that of the file most of its tokens come from, or its noise kind.

    Rows are packed from one stream of the files' tokens, each file followed by a separator, so each
    file's own token count places every token in its file (counting separators would not: a file's
    text may hold the separator token itself). Where the counts do not add up to the stream that was
    packed, the rows are all called ``clean``."""
    split = corpus.splits["train"]
    tok = getattr(corpus.tokenizer, "backend_tokenizer", corpus.tokenizer)
    sizes = []
    for i in range(0, len(split.files), 256):
        chunk = [corpus_mod.read_text(f) for f in split.files[i:i + 256]]
        sizes.extend(len(enc.ids) + 1 for enc in tok.encode_batch(chunk, add_special_tokens=False))
    kinds = ["clean"] * n_clean
    width = train.shape[1]
    if sum(sizes) == split.tokens and sum(sizes) >= n_clean * width:
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        by_file = [file_kind(f.key) for f in split.files]
        kinds = [by_file[int(i)] for i in owner[: n_clean * width].view(n_clean, width).mode(dim=1).values]
    n_noise = train.shape[0] - n_clean
    shuffled = int(noise_info["token_shuffled"]) if noise_info else 0
    return kinds + [NOISE_SHUFFLED if j < shuffled else NOISE_BINARY for j in range(n_noise)]


def profile(kinds: list[str], scores: list[torch.Tensor], batches: list[torch.Tensor], k: int, floor: float,
            seq_len: int, full: list[torch.Tensor] | None = None) -> dict:
    """Per kind: its share of the rows scored, of top-k's, of importance sampling's (expected draws)
    and of a random subset's, its rows' mean router loss and (``full``: the whole model's loss of the
    first batches' rows) their mean loss under the whole model."""
    stream, topk, importance = Counter(), Counter(), Counter()
    loss_sum: Counter = Counter()
    full_sum, full_n = Counter(), Counter()
    for idx, f in zip(batches, full or []):
        for j, row in enumerate(idx.tolist()):
            full_sum[kinds[row]] += float(f[j])
            full_n[kinds[row]] += 1
    for idx, s in zip(batches, scores):
        counts = torch.full_like(s, float(seq_len))  # every position of a packed row is valid
        draws = importance_probabilities(s, counts, floor) * k
        for j, row in enumerate(idx.tolist()):
            kind = kinds[row]
            stream[kind] += 1
            loss_sum[kind] += float(s[j])
            importance[kind] += float(draws[j])
        for j in torch.topk(s, k).indices.tolist():
            topk[kinds[int(idx[j])]] += 1
    rows, picked = sum(stream.values()), k * len(batches)
    out = {}
    for kind in sorted(stream, key=lambda x: -stream[x]):
        out[kind] = dict(stream_share=round(stream[kind] / rows, 4), random_share=round(stream[kind] / rows, 4),
                         topk_share=round(topk[kind] / picked, 4),
                         importance_share=round(importance[kind] / picked, 4),
                         mean_router_loss=round(loss_sum[kind] / stream[kind], 4), rows=stream[kind])
        if full_n[kind]:
            out[kind]["mean_model_loss"] = round(full_sum[kind] / full_n[kind], 4)
    return out


def score_agreement(scores: list[torch.Tensor], full: list[torch.Tensor], kinds: list[str],
                    batches: list[torch.Tensor]) -> dict:
    """Spearman correlation of the router's row scores with the whole model's row losses (the rows of
    the batches ``full`` covers), over all of them and over the clean rows alone."""
    n = len(full)
    s, f = torch.cat(scores[:n]), torch.cat(full)
    clean = torch.tensor([not kinds[int(r)].startswith("noise") for idx in batches[:n] for r in idx])
    out = dict(rows=int(s.numel()), spearman_all=round(spearman(s.numpy(), f.numpy()), 4))
    if int(clean.sum()) > 2:
        out["spearman_clean"] = round(spearman(s[clean].numpy(), f[clean].numpy()), 4)
    return out


def router_depths(model, x: torch.Tensor, depths: list[int]) -> list[dict]:
    """The truncated router at each depth (its first ``d`` layers, then the model's final norm and
    head, as CGGR builds it) against the whole model, on rows ``x``: mean loss per token, how often its
    most likely token is the next one, and the share of positions its five most frequent top-1 tokens
    take (a router that says the same few tokens everywhere measures little of the text)."""
    out = []
    n_layers = model.config.num_hidden_layers
    for d in depths + [n_layers]:
        with torch.no_grad():
            if d < n_layers:
                logits = cggr_compile.transform(model, router_layers=d, scoring="loss", strict=True, warmup_steps=0,
                                                dynamic_threshold=False).router(x)
            else:
                logits = model(input_ids=x).logits
        top, target = logits[:, :-1].argmax(dim=-1), x[:, 1:]
        counts = top.flatten().unique(return_counts=True)[1].sort(descending=True).values
        out.append(dict(layers=d, whole_model=d == n_layers, rows=int(x.shape[0]),
                        loss=round(float(token_nll(logits, x)[:, :-1].mean()), 4),
                        top1_is_next=round(float((top == target).float().mean()), 4),
                        top5_tokens_share=round(float(counts[:5].sum() / top.numel()), 4)))
    return out


def row_agreement(scores: dict[str, torch.Tensor], model_loss: torch.Tensor, noise: torch.Tensor,
                  batch: int) -> dict:
    """How each per-row score ranks rows like the whole model's own row loss ``model_loss``.

    ``scores``: name -> one score per row; rows come in consecutive batches of ``batch``; ``noise``
    marks the noise rows. Per score: the Spearman correlation with ``model_loss`` over the clean rows,
    pooled and per batch (batches with at least 3 clean rows), and, where there are noise rows, over
    those and over all rows; the score's mean over the clean rows (and over the noise rows)."""
    f = model_loss.double()
    clean = ~noise.bool()
    n = f.numel()
    out = dict(rows=n, clean_rows=int(clean.sum()), noise_rows=int(n - clean.sum()), batches=-(-n // batch),
               model_loss_clean_mean=round(float(f[clean].mean()), 4) if clean.any() else None)
    for name, s in scores.items():
        s = s.double()
        per_batch = []
        for i in range(0, n, batch):
            c = clean[i:i + batch]
            if int(c.sum()) >= 3:
                per_batch.append(round(spearman(s[i:i + batch][c].numpy(), f[i:i + batch][c].numpy()), 4))
        r = dict(spearman_clean=round(spearman(s[clean].numpy(), f[clean].numpy()), 4) if int(clean.sum()) > 2
                 else None, spearman_clean_per_batch=per_batch,
                 spearman_clean_per_batch_mean=round(sum(per_batch) / len(per_batch), 4) if per_batch else None,
                 mean_clean=round(float(s[clean].mean()), 4) if clean.any() else None)
        if out["noise_rows"]:
            r["spearman_noise"] = round(spearman(s[~clean].numpy(), f[~clean].numpy()), 4) \
                if out["noise_rows"] > 2 else None
            r["spearman_all"] = round(spearman(s.numpy(), f.numpy()), 4)
            r["mean_noise"] = round(float(s[~clean].mean()), 4)
        out[name] = r
    return out


def calibration(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """R^2 and mean error of ``pred`` as a predictor of ``target`` (row losses, same scale)."""
    pred, target = pred.double(), target.double()
    ss_tot = float(((target - target.mean()) ** 2).sum())
    ss_res = float(((target - pred) ** 2).sum())
    return dict(r2=round(1 - ss_res / ss_tot, 4) if ss_tot > 0 else None,
                mean_error=round(float((pred - target).mean()), 4))


def finetune_with_exit(model, train: torch.Tensor, order: "BatchOrder", args, steps: int, device,
                       exit_decay: float | None = None, log=print):
    """``steps`` AdamW steps of ``model`` through ``cggr_compile.transform(scoring="predicted")`` with
    the library's defaults besides ``router_layers`` (and ``exit_decay`` when given), at the race's
    learning rate, linear lr warm-up, weight decay and gradient clipping (its ``ModeRunner.step``).
    Returns the transform, the batches seen (row indices) and a record per step: the loss, the rows
    the step drew and how many distinct, the exit's metrics and the step's seconds."""
    options = dict(scoring="predicted", router_layers=args.router_layers)
    if exit_decay is not None:
        options["exit_decay"] = exit_decay
    cg = cggr_compile.transform(model, **options)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, args.lr, device, args.weight_decay)
    seen, records = [], []
    t_start = time.perf_counter()
    for n in range(steps):
        idx = order.next()
        seen.append(idx)
        x = train[idx].to(device)
        t0 = time.perf_counter()
        if args.lr_warmup_steps > 0:
            for g in opt.param_groups:
                g["lr"] = args.lr * min(1.0, (n + 1) / args.lr_warmup_steps)
        with autocast_ctx(device, args.dtype):
            out = cg(input_ids=x, labels=x)
        out.loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sel = out["selected_indices"].detach().cpu()
        m = cg.metrics()
        rec = dict(step=n + 1, loss=round(float(out.loss.detach()), 4), k=int(sel.numel()),
                   distinct_rows=int(sel.unique().numel()), seconds=round(time.perf_counter() - t0, 2),
                   **{key: round(float(m[key]), 4) for key in EXIT_METRIC_KEYS if key in m})
        records.append(rec)
        if n == 0 or (n + 1) % 5 == 0 or n + 1 == steps:
            log(f"step {n + 1}/{steps}: loss {rec['loss']:.3f}, k {rec['k']} ({rec['distinct_rows']} distinct rows), "
                f"exit ready {rec.get('exit_ready')}, fits {rec.get('exit_fits')}, rank agreement "
                f"{rec.get('exit_rank_agreement')}, r2 {rec.get('exit_r2')}; {rec['seconds']:.1f} s this step, "
                f"{time.perf_counter() - t_start:.0f} s in all")
    return cg, seen, records


def exit_agreement(mine, args, pre, vocab_size: int, train: torch.Tensor, n_clean: int, noise_info, device, argv,
                   t0: float, versions: dict | None = None) -> dict:
    """``--finetune-steps``: fine-tune through the learned exit, then rank held-out rows of the stream
    by the exit, by the head router and by the whole model (see the module docstring). ``versions``:
    ``common.versions()`` (with the library's diff hash) as the process started."""
    B = args.batch_size
    model, _ = build_model(args, vocab_size)
    if pre:
        model.load_state_dict(pre["state"])
    model.to(device)
    order = BatchOrder(train.shape[0], B, args.seed)
    print(f"fine-tuning {pre['id'] if pre else 'a random-init model'} for {mine.finetune_steps} steps of "
          f"{B} x {args.seq_len} tokens through scoring='predicted', router {args.router_layers} layers, lr "
          f"{args.lr}; {time.perf_counter() - t0:.0f} s so far", flush=True)
    t_ft = time.perf_counter()
    cg, seen, steps = finetune_with_exit(model, train, order, args, mine.finetune_steps, device, mine.exit_decay,
                                         log=lambda msg: print(msg, flush=True))
    finetune_s = time.perf_counter() - t_ft
    metrics = {key: round(float(v), 4) for key, v in cg.metrics().items()
               if key in EXIT_METRIC_KEYS or key in ("k", "ratio")}
    held = [order.next() for _ in range(mine.heldout_batches)]
    trained = set(torch.cat(seen).tolist())
    rows = torch.cat(held)
    if trained & set(rows.tolist()):
        raise SystemExit("the held-out batches overlap the fine-tuning batches (the stream wrapped around): "
                         "fewer --finetune-steps or --heldout-batches, or a longer corpus")
    model.eval()
    head = cggr_compile.transform(model, router_layers=args.router_layers, scoring="loss", strict=True,
                                  warmup_steps=0, dynamic_threshold=False)
    t_eval = time.perf_counter()
    x = train[rows]
    exit_scores = router_scores(cg, x, B, device, args.dtype)
    head_scores = router_scores(head, x, B, device, args.dtype)
    model_loss = heldout_losses(model, x, B, device, args.dtype)
    eval_s = time.perf_counter() - t_eval
    noise = rows >= n_clean
    agreement = row_agreement({"exit": exit_scores, "head_router": head_scores}, model_loss, noise, B)
    agreement["exit"]["calibration_clean"] = calibration(exit_scores[~noise], model_loss[~noise])
    agreement["exit_vs_head_spearman_clean"] = round(spearman(exit_scores[~noise].numpy(),
                                                                   head_scores[~noise].numpy()), 4)
    distinct = [s["distinct_rows"] for s in steps]
    summary = dict(
        steps=len(steps), batch_size=B, seq_len=args.seq_len, heldout_batches=mine.heldout_batches,
        rows=agreement["rows"], clean_rows=agreement["clean_rows"], noise_rows=agreement["noise_rows"],
        exit_spearman_clean=agreement["exit"]["spearman_clean"],
        head_router_spearman_clean=agreement["head_router"]["spearman_clean"],
        exit_spearman_noise=agreement["exit"].get("spearman_noise"),
        head_router_spearman_noise=agreement["head_router"].get("spearman_noise"),
        target=0.7, exit_meets_target=bool((agreement["exit"]["spearman_clean"] or -1) >= 0.7),
        steps_at_k_equal_b=sum(s["k"] == B for s in steps), steps_exit_ready=sum(s.get("exit_ready", 0) > 0 for s in steps),
        distinct_rows_per_step_mean=round(sum(distinct) / len(distinct), 2), distinct_rows_per_step_min=min(distinct),
        finetune_seconds=round(finetune_s, 1), eval_seconds=round(eval_s, 1),
        seconds_per_step_median=round(sorted(s["seconds"] for s in steps)[len(steps) // 2], 2),
        final_metrics=metrics)
    print(f"held-out: {agreement['rows']} rows in {mine.heldout_batches} batches ({agreement['clean_rows']} clean), "
          f"scored in {eval_s:.0f} s")
    for name in ("exit", "head_router"):
        r = agreement[name]
        extra = f"; noise rows {r['spearman_noise']}, all rows {r['spearman_all']}" if "spearman_noise" in r else ""
        print(f"{name}: Spearman with the whole model's row loss over the clean rows {r['spearman_clean']} "
              f"(per batch: mean {r['spearman_clean_per_batch_mean']}, {r['spearman_clean_per_batch']}){extra}")
    print(f"exit as a predictor of the clean rows' loss: {agreement['exit']['calibration_clean']}; the library's "
          f"metrics after the last step: {metrics}")
    report = dict(command=common.command_line("selection_profile.py", argv), device=common.device_name(device),
                  versions=versions or dict(common.versions(), library_diff_sha256=library_diff_hash()),
                  preset=args.preset,
                  regime=args.regime, model=pre["id"] if pre else "random init", seed=args.seed,
                  lr=args.lr, lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay,
                  grad_clip=args.grad_clip, router_layers=args.router_layers, dtype=args.dtype,
                  cggr_options=dict(scoring="predicted", router_layers=args.router_layers,
                                    **({"exit_decay": mine.exit_decay} if mine.exit_decay is not None else {})),
                  library_defaults={key: getattr(cg.cggr_config, key) for key in (
                      "min_tokens_ratio", "warmup_steps", "selection", "granularity", "importance_floor",
                      "exit_decay", "exit_ridge", "exit_min_fits", "seed")},
                  heldout="the --heldout-batches batches of the race's stream after the fine-tuning ones "
                          "(rows never trained on)", heldout_rows=rows.tolist(),
                  noise=noise_info, summary=summary, agreement=agreement, finetune_steps=steps,
                  seconds=round(time.perf_counter() - t0, 1))
    name = f"{args.tag or args.preset}-{args.regime}-exit-agreement"
    stem = common.result_stem("selection_profile", name, common.device_slug(device))
    path = common.write_json(Path(args.results_dir) / f"{stem}.json", report)
    print(f"wrote {path} ({report['seconds']:.0f} s in all)")
    return report


def library_diff_hash() -> str | None:
    """sha256 of ``git diff HEAD`` over the library (empty when it is the commit's): which library
    ran, when the checkout has uncommitted changes (``versions()['library_dirty']``)."""
    import hashlib
    import subprocess

    try:
        diff = subprocess.run(["git", "diff", "HEAD", "--", "cggr_compile", "passes"], cwd=REPO,
                              capture_output=True, timeout=30).stdout
    except Exception:  # noqa: BLE001
        return None
    return hashlib.sha256(diff).hexdigest() if diff else ""


def table(kinds: dict) -> str:
    lines = ["| rows from | share of the stream (= random subset) | top-k | importance (default) | mean router loss "
             "| mean loss of the whole model |", "|---|---|---|---|---|---|"]
    for kind, r in kinds.items():
        model = f"{r['mean_model_loss']:.3f}" if "mean_model_loss" in r else "–"
        lines.append(f"| {kind} | {r['stream_share']:.3f} ({r['rows']} rows) | {r['topk_share']:.3f} | "
                     f"{r['importance_share']:.3f} | {r['mean_router_loss']:.3f} | {model} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--batches", type=int, default=16, help="training batches to score (default 16)")
    own.add_argument("--depths", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=[],
                     help="comma list of other router depths to compare on a few clean rows (with --router-layers "
                     "and the whole model)")
    own.add_argument("--finetune-steps", type=int, default=0,
                     help="the learned exit's agreement instead of the profile: fine-tune this many steps through "
                     "scoring='predicted', then rank held-out rows by the exit, the head router and the whole "
                     "model (default 0: off)")
    own.add_argument("--heldout-batches", type=int, default=16,
                     help="--finetune-steps: batches of the stream after the fine-tuning ones to score (default 16)")
    own.add_argument("--exit-decay", type=float, default=None,
                     help="--finetune-steps: the transform's exit_decay (default: the library's)")
    own.add_argument("--model-loss-batches", type=int, default=4,
                     help="of those, how many the whole model also scores (its loss per row; default 4)")
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if mine.batches < 1:
        raise SystemExit("--batches must be >= 1")
    if mine.finetune_steps < 0 or (mine.finetune_steps and mine.heldout_batches < 1):
        raise SystemExit("--finetune-steps must be >= 0, and --heldout-batches >= 1 with it")
    args = parse_args(rest)
    device = common.pick_device(args.device)
    args.dtype = args.dtype or (PRESETS[args.preset]["dtype"] if device.type == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # the library as this process imported it (the checkout may change while a long run goes on)
    versions = dict(common.versions(), library_diff_sha256=library_diff_hash()) if mine.finetune_steps else None
    pre = pretrained_for(args)
    corpus = race_corpus(args, pre)
    train, noise_info = mix_noise(args, corpus, corpus.splits["train"].sequences)
    n_clean = args.n_clean_train or train.shape[0]
    if mine.finetune_steps:
        return exit_agreement(mine, args, pre, corpus.vocab_size, train, n_clean, noise_info, device, argv, t0,
                              versions)
    kinds = row_kinds(corpus, train, n_clean, noise_info)
    model, _ = build_model(args, corpus.vocab_size)
    if pre:
        model.load_state_dict(pre["state"])
    model.to(device).eval()
    cg = cggr_compile.transform(model, router_layers=args.router_layers, scoring="loss", strict=True,
                                warmup_steps=0, dynamic_threshold=False)
    k = subset_k(args.ratio, args.batch_size)
    order = BatchOrder(train.shape[0], args.batch_size, args.seed)
    batches = [order.next() for _ in range(mine.batches)]
    scores = [router_scores(cg, train[idx], args.batch_size, device, args.dtype) for idx in batches]
    full = [heldout_losses(model, train[idx], args.batch_size, device, args.dtype)
            for idx in batches[:max(0, mine.model_loss_batches)]]
    floor = cggr_compile.CGGRConfig().importance_floor
    result = profile(kinds, scores, batches, k, floor, args.seq_len, full)
    agreement = score_agreement(scores, full, kinds, batches) if full else None
    clean_rows = [r for r in batches[0].tolist() if not kinds[r].startswith("noise")][:8]
    depths = sorted({args.router_layers, *mine.depths} - {0})
    depth_check = router_depths(model, train[clean_rows].to(device), [d for d in depths if d < model.config.num_hidden_layers]) \
        if clean_rows else None
    print(table(result))
    if agreement:
        print(f"router score vs the whole model's loss, Spearman over {agreement['rows']} rows: "
              f"{agreement['spearman_all']} (clean rows: {agreement.get('spearman_clean')})")
    for r in depth_check or []:
        print(f"{'whole model' if r['whole_model'] else 'router of %d layers' % r['layers']} on {r['rows']} clean rows: "
              f"loss {r['loss']:.3f}, top-1 = next token {r['top1_is_next']:.1%}, its 5 most frequent top-1 tokens "
              f"{r['top5_tokens_share']:.1%} of positions")
    report = dict(command=common.command_line("selection_profile.py", argv), device=common.device_name(device),
                  versions=common.versions(), preset=args.preset, regime=args.regime,
                  model=pre["id"] if pre else "random init", batch_size=args.batch_size, k=k,
                  router_layers=args.router_layers, importance_floor=floor, batches=mine.batches, seed=args.seed,
                  model_loss_batches=len(full), seconds=round(time.perf_counter() - t0, 1), noise=noise_info,
                  router_vs_model_loss=agreement, router_depths_clean=depth_check,
                  kinds=result)
    stem = common.result_stem("selection_profile", f"{args.tag or args.preset}-{args.regime}", common.device_slug(device))
    path = common.write_json(Path(args.results_dir) / f"{stem}.json", report)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
