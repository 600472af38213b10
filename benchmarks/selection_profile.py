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
depths with the whole model on a few clean rows; ``--exit-fit-batches`` fits a linear exit for the
router (a tuned lens) and ranks rows by it. JSON goes to ``--results-dir`` (``benchmarks/runs`` by
default).
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
from cggr_compile.scoring import importance_probabilities  # noqa: E402
from benchmarks import common, corpus as corpus_mod, race  # noqa: E402

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
    out = dict(rows=int(s.numel()), spearman_all=round(race.spearman(s.numpy(), f.numpy()), 4))
    if int(clean.sum()) > 2:
        out["spearman_clean"] = round(race.spearman(s[clean].numpy(), f[clean].numpy()), 4)
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
                        loss=round(float(race.token_nll(logits, x)[:, :-1].mean()), 4),
                        top1_is_next=round(float((top == target).float().mean()), 4),
                        top5_tokens_share=round(float(counts[:5].sum() / top.numel()), 4)))
    return out


def rows_loss(head, hidden: torch.Tensor, x: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Each row's mean next-token loss of ``head(hidden)`` (``hidden``: ``[B, T, H]`` for tokens ``x``)."""
    out = []
    for i in range(0, x.shape[0], chunk):
        out.append(race.token_nll(head(hidden[i:i + chunk]), x[i:i + chunk])[:, :-1].mean(dim=1))
    return torch.cat(out)


def linear_exit(model, cg, fit_x: torch.Tensor, eval_x: torch.Tensor, eval_model_loss: torch.Tensor) -> dict:
    """A linear map from the router's (final-normed) hidden state to the whole model's, fitted by
    least squares on the rows ``fit_x`` (a tuned lens, Belrose et al. 2023, in its simplest form),
    then the router's row loss through it on other rows: does a trained exit make the truncated
    router's score the model's difficulty? Spearman with the whole model's loss of ``eval_x``."""
    with torch.no_grad():
        hk = cg.router.hidden(fit_x)[:, :-1].flatten(0, 1).double()
        hf = model.model(input_ids=fit_x).last_hidden_state[:, :-1].reshape(hk.shape).double()
        ones = torch.ones(hk.shape[0], 1, dtype=hk.dtype)
        w = torch.linalg.lstsq(torch.cat([hk, ones], 1), hf).solution.float()
        hidden = cg.router.hidden(eval_x)
        raw = rows_loss(cg.router.head, hidden, eval_x)
        lens = rows_loss(cg.router.head, hidden @ w[:-1] + w[-1], eval_x)
    m = eval_model_loss.numpy()
    return dict(fit_rows=int(fit_x.shape[0]), eval_rows=int(eval_x.shape[0]),
                router_loss=round(float(raw.mean()), 4), exit_loss=round(float(lens.mean()), 4),
                model_loss=round(float(eval_model_loss.mean()), 4),
                spearman_router=round(race.spearman(raw.numpy(), m), 4),
                spearman_exit=round(race.spearman(lens.numpy(), m), 4))


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
    own.add_argument("--exit-fit-batches", type=int, default=0,
                     help="fit a linear exit for the router (a tuned lens) on the clean rows of this many batches "
                     "after the scored ones, and rank the model-loss batches' clean rows by it (default 0: off)")
    own.add_argument("--model-loss-batches", type=int, default=4,
                     help="of those, how many the whole model also scores (its loss per row; default 4)")
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if mine.batches < 1:
        raise SystemExit("--batches must be >= 1")
    args = race.parse_args(rest)
    device = common.pick_device(args.device)
    args.dtype = args.dtype or (race.PRESETS[args.preset]["dtype"] if device.type == "cuda" else "fp32")
    t0 = time.perf_counter()
    pre = race.load_pretrained(args) if args.regime in corpus_mod.PRETRAINED_REGIMES else None
    args.hf_config = pre["config"] if pre else None
    corpus = race.race_corpus(args, pre)
    train, noise_info = race.mix_noise(args, corpus, corpus.splits["train"].sequences)
    n_clean = args.n_clean_train or train.shape[0]
    kinds = row_kinds(corpus, train, n_clean, noise_info)
    model, _ = race.build_model(args, corpus.vocab_size)
    if pre:
        model.load_state_dict(pre["state"])
    model.to(device).eval()
    cg = cggr_compile.transform(model, router_layers=args.router_layers, scoring="loss", strict=True,
                                warmup_steps=0, dynamic_threshold=False)
    k = race.subset_k(args.ratio, args.batch_size)
    order = race.BatchOrder(train.shape[0], args.batch_size, args.seed)
    batches = [order.next() for _ in range(mine.batches)]
    scores = [race.router_scores(cg, train[idx], args.batch_size, device, args.dtype) for idx in batches]
    full = [race.heldout_losses(model, train[idx], args.batch_size, device, args.dtype)
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
    exit_check = None
    if mine.exit_fit_batches > 0 and full:
        fit_rows = [r for _ in range(mine.exit_fit_batches) for r in order.next().tolist()
                    if not kinds[r].startswith("noise")]
        eval_rows = [(r, float(f[j])) for idx, f in zip(batches, full) for j, r in enumerate(idx.tolist())
                     if not kinds[r].startswith("noise")]
        exit_check = linear_exit(model, cg, train[fit_rows].to(device), train[[r for r, _ in eval_rows]].to(device),
                                 torch.tensor([f for _, f in eval_rows]))
        print(f"linear exit fitted on {exit_check['fit_rows']} clean rows, on {exit_check['eval_rows']} others: "
              f"router loss {exit_check['router_loss']:.3f} -> {exit_check['exit_loss']:.3f} (model "
              f"{exit_check['model_loss']:.3f}); Spearman with the model's loss {exit_check['spearman_router']} -> "
              f"{exit_check['spearman_exit']}")
    for r in depth_check or []:
        print(f"{'whole model' if r['whole_model'] else 'router of %d layers' % r['layers']} on {r['rows']} clean rows: "
              f"loss {r['loss']:.3f}, top-1 = next token {r['top1_is_next']:.1%}, its 5 most frequent top-1 tokens "
              f"{r['top5_tokens_share']:.1%} of positions")
    report = dict(command=common.command_line("selection_profile.py", argv), device=common.device_name(device),
                  versions=common.versions(), preset=args.preset, regime=args.regime,
                  model=pre["id"] if pre else "random init", batch_size=args.batch_size, k=k,
                  router_layers=args.router_layers, importance_floor=floor, batches=mine.batches, seed=args.seed,
                  model_loss_batches=len(full), seconds=round(time.perf_counter() - t0, 1), noise=noise_info,
                  router_vs_model_loss=agreement, router_depths_clean=depth_check, linear_exit_clean=exit_check,
                  kinds=result)
    stem = common.result_stem("selection_profile", f"{args.tag or args.preset}-{args.regime}", common.device_slug(device))
    path = common.write_json(Path(args.results_dir) / f"{stem}.json", report)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
