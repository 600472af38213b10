"""The race's data: the corpus, the training stream (with replay or noise mixed in) and the fixed
held-out set every mode is judged on.

Corpus: ``benchmarks/corpus.py`` (by default the ``*.py`` files of this interpreter's standard library,
split by file into train / held-out, a byte-level BPE trained on the train files; in the pretrained
regimes the model's own tokenizer).

Regimes: ``scratch`` (random init, race on the train split); ``finetune`` (a base model trained on one
half of the packages, race on the other half); ``finetune-mixed`` (continued training with replay: the
base model trains on the train files of part A; the race's stream is a seeded shuffle of part B's train
sequences and ``--replay-fraction`` of A's (the base model's own training sequences, already learned);
held-out loss is reported on B's held-out files (``heldout_new``, the new domain) and on A's held-out
files (``heldout_replay``, retention, never trained on), ``--eval-sequences`` of each, and the headline
``heldout_loss`` is the mean of the two). ``pretrained``: fine-tune a real pretrained model
(``harness/references.py``) on the embedded corpus; ``--reference-fraction`` of the *train* files'
bytes (by file) becomes the ``reference`` split, which the race's stream never contains.
``pretrained-noisy``: the same, and the training stream mixes in ``--noise-fraction`` (default 0.25) of
unlearnable sequences made on the machine (``harness/noise.py:make_noise``: token-shuffled train sequences,
base64 / hex dumps of the interpreter's shared objects); the held-out set stays clean. ``--noise-kind
scraped`` mixes in realistic junk instead, what a web / code scraper would keep, read from this
machine's files (``harness/noise.py:make_scraped_noise``: minified / generated code, data dumps, translation
catalogs, license boilerplate): text a model can partly model, but that teaches it nothing about the
corpus. ``--noise-fraction`` also applies to the scratch regime.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks import corpus as corpus_mod
from benchmarks.harness import noise as noise_mod


def race_corpus(args, pre: dict | None, log=print) -> "corpus_mod.Corpus":
    """The race's corpus (splits, tokenizer, packed sequences) for ``args``; ``pre`` is
    :func:`load_pretrained`'s result in the pretrained regimes (its tokenizer is used), else None."""
    pretrained_regime = args.regime in corpus_mod.PRETRAINED_REGIMES
    source = args.corpus or ("stdlib+site" if args.include_site_packages else "stdlib")
    corpus = corpus_mod.build_corpus(
        source, seq_len=args.seq_len, vocab_size=args.vocab_size, seed=args.seed,
        heldout_fraction=args.heldout_fraction, max_bytes=args.max_bytes or None,
        max_file_bytes=args.max_file_bytes, tokenizer_max_bytes=args.tokenizer_max_bytes or None,
        regime=args.regime, cache_dir=Path(args.cache_dir), log=log,
        race_packages=[x.strip() for x in args.race_packages.split(",")] if args.race_packages else None,
        tokenizer=pre["tokenizer"] if pre else None,
        reference_fraction=args.reference_fraction if pretrained_regime else 0.0)
    log(f"corpus: {source}: {corpus.scan_description}")
    if args.max_bytes:
        log(f"corpus: capped to {args.max_bytes:,} bytes (a seeded random subset of the files)")
    for s in corpus.splits.values():
        log(f"  {s.name:8s}: {len(s.files):6d} files  {s.bytes:13,d} bytes  {s.tokens:12,d} tokens  "
            f"{s.sequences.shape[0]:8d} sequences of {args.seq_len + 1}")
    return corpus


def mix_noise(args, corpus: "corpus_mod.Corpus", train: torch.Tensor, log=print) -> tuple[torch.Tensor, dict | None]:
    """``train`` with ``--noise-fraction`` of noise sequences of ``--noise-kind`` appended (rows from
    ``args.n_clean_train`` on are noise; None without noise), and what the noise is."""
    args.n_clean_train = None
    if args.noise_fraction <= 0:
        return train, None
    n_clean = train.shape[0]
    n_noise = round(args.noise_fraction / (1 - args.noise_fraction) * n_clean)
    kind = getattr(args, "noise_kind", "unlearnable")
    t0 = time.perf_counter()
    common = dict(seed=args.seed, cache_dir=Path(args.cache_dir), tok_key=corpus.tokenizer_key, log=log)
    if kind == "scraped":
        noise, noise_info = noise_mod.make_scraped_noise(corpus.tokenizer, n_noise, args.seq_len, **common)
        what = "scraped sequences (" + ", ".join(f"{k} {v['rows']} from {v['files_used']} of {v['files']} files"
                                                 for k, v in noise_info["kinds"].items()) + ")"
    else:
        noise, noise_info = noise_mod.make_noise(corpus.tokenizer, n_noise, args.seq_len, train, **common)
        what = (f"unlearnable sequences ({noise_info['token_shuffled']} token-shuffled, {noise_info['binary_dumps']} "
                f"base64 / hex dumps of {noise_info['binary_files']} shared objects)")
    args.n_clean_train = n_clean
    noise_info = dict(noise_info, kind=kind, clean_train_sequences=n_clean, noise_train_sequences=n_noise,
                      noise_share=round(n_noise / (n_noise + n_clean), 4), seconds=round(time.perf_counter() - t0, 2))
    log(f"noise: {n_noise} {what} mixed into {n_clean} clean ones ({noise_info['noise_share']:.0%} of the stream); "
        f"held-out stays clean")
    return torch.cat([train, noise]), noise_info



def pick_eval(args, held: torch.Tensor, log=print) -> torch.Tensor:
    """The fixed held-out set: ``--eval-sequences`` evenly spaced over the held-out stream (``spread``,
    so that the set spans its files) or its first ones (``first``)."""
    if args.eval_pick == "first" or args.eval_sequences >= held.shape[0]:
        ev = held[: args.eval_sequences]
    else:
        ev = held[torch.linspace(0, held.shape[0] - 1, args.eval_sequences).round().long()]
    if ev.shape[0] < args.eval_sequences:
        log(f"warning: only {ev.shape[0]} held-out sequences (asked {args.eval_sequences})")
    return ev


def race_stream(args, corpus: "corpus_mod.Corpus", log=print) -> tuple[torch.Tensor, torch.Tensor, dict | None, dict | None]:
    """``(train, eval_seqs, mix_info, noise_info)``: the race's training stream and fixed held-out set.

    Sets ``args.n_new_train`` / ``args.eval_n_new`` (finetune-mixed: the rows and eval sequences before
    them are the new domain's) and ``args.n_clean_train`` (noise: the rows from it on are noise); the
    training loop reads them to count what it trained."""
    train = corpus.splits["train"].sequences
    eval_seqs = pick_eval(args, corpus.splits["heldout"].sequences, log)
    args.eval_n_new = args.n_new_train = None
    mix_info = None
    if args.regime == "finetune-mixed":
        # all of B's train sequences plus a seeded sample of A's (the base model's own train sequences)
        # making up --replay-fraction of the stream (as many as A has, at most)
        base_seqs = corpus.splits["base"].sequences
        n_b = train.shape[0]
        n_a = min(base_seqs.shape[0], round(args.replay_fraction / (1 - args.replay_fraction) * n_b))
        pick_a = torch.randperm(base_seqs.shape[0], generator=torch.Generator().manual_seed(args.seed + 11))[:n_a]
        train = torch.cat([train, base_seqs[pick_a]])  # indices >= n_b are replay
        args.n_new_train = n_b
        args.eval_n_new = eval_seqs.shape[0]
        eval_replay = pick_eval(args, corpus.splits["heldout_base"].sequences, log)
        eval_seqs = torch.cat([eval_seqs, eval_replay])
        mix_info = dict(new_train_sequences=n_b, replay_train_sequences=n_a,
                        replay_share=round(n_a / (n_a + n_b), 4), eval_new=args.eval_n_new,
                        eval_replay=int(eval_replay.shape[0]))
        log(f"finetune-mixed: race stream {n_b} new (B) + {n_a} replayed (A) sequences "
            f"({mix_info['replay_share']:.0%} replay), shuffled; eval {args.eval_n_new} new + "
            f"{eval_replay.shape[0]} replay held-out sequences")
    train, noise_info = mix_noise(args, corpus, train, log)
    return train, eval_seqs, mix_info, noise_info
