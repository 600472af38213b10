"""The models a race starts from or measures against, and their caches under ``--cache-dir``.

* The pretrained model (``--model``): SmolLM2-135M-Instruct from its GGUF (``benchmarks/pretrained.py``),
  ``smollm2-tiny`` (its tokenizer and config, a random-init Llama of the preset's shape: a CPU stand-in)
  or any folder with a transformers model and a fast tokenizer.
* The finetune regimes' base model: the initial model trained full-batch on the base part.
* The reference model (RHO-LOSS), for the ``cggr-reducible*`` modes (or ``--with-reference``): a copy of
  the initial pretrained model fine-tuned full-batch on the reference split for
  ``--reference-budget-seconds`` of step time (the ``full`` mode's compiled module, so no extra
  compile), then, once and offline (batched, no grad), its per-sequence mean next-token loss of every
  training-stream sequence. ``cggr-reducible`` passes the batch's rows of it to the library each step
  (``cg(input_ids=x, labels=x, reference_loss=ref_loss[idx])``). The race reports the reference's cost and
  ``all_in``: the reducible modes' held-out loss at ``budget - (reference training + scoring)`` seconds of
  their own curve against every other mode's at the full budget (``harness/race_report.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from benchmarks import corpus as corpus_mod
from benchmarks import pretrained as pretrained_mod
from benchmarks.common import require_cggr_compile, sync
from benchmarks.harness.race_modes import ModeRunner, build_model, make_step_fn
from benchmarks.harness.training import BatchOrder, heldout_losses, train_for_budget

cggr_compile = require_cggr_compile()


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


def pretrained_for(args, log=print) -> dict | None:
    """:func:`load_pretrained`'s model when ``args.regime`` is a pretrained one, else None; sets
    ``args.hf_config`` (its config, or None), the architecture ``build_model`` then builds."""
    pre = load_pretrained(args, log) if args.regime in corpus_mod.PRETRAINED_REGIMES else None
    args.hf_config = pre["config"] if pre else None
    return pre


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



def initial_weights(args, corpus, pre: dict | None, device, log=print) -> tuple[dict, object, int, dict | None]:
    """``(state, config, parameter count, base model info)`` the race starts every mode from: the
    pretrained model's weights, else a seeded random init, trained first into the base model in the
    finetune regimes."""
    base_info = None
    if pre:
        cfg, init_state, n_params = pre["config"], pre["state"], pre["info"]["n_params"]
    else:
        torch.manual_seed(args.seed)
        model0, cfg = build_model(args, corpus.vocab_size)
        n_params = sum(p.numel() for p in model0.parameters())
        init_state = {k: v.detach().clone() for k, v in model0.state_dict().items()}
        del model0
    if args.regime in ("finetune", "finetune-mixed"):
        init_state, base_info = base_model_state(args, corpus, init_state, device, log)
    return init_state, cfg, n_params, base_info


def race_reference(args, corpus, init_state: dict, device, runner: ModeRunner, model_id: str,
                   eval_seqs: torch.Tensor, train_cpu: torch.Tensor, log=print) -> dict:
    """The reference model's losses of the training stream (``loss``, on ``device``), what it cost
    (``info``: training, ``scoring``: the offline pass) and their means (``summary``, clean and noise
    apart). Sets ``args.ref_eval``, its losses of the eval sequences, for the reducible modes' probe."""
    ref_state, ref_info = reference_state(args, corpus, init_state, device, runner, model_id, eval_seqs, log)
    ref_loss, score_info = reference_losses(args, ref_state, ref_info["key"], train_cpu, corpus.vocab_size,
                                            device, log)
    m_ref, _ = build_model(args, corpus.vocab_size)
    m_ref.load_state_dict(ref_state)
    args.ref_eval = heldout_losses(m_ref.to(device), eval_seqs, args.eval_batch_size or args.batch_size,
                                   device, args.dtype)
    del ref_state, m_ref
    summary = dict(mean=round(float(ref_loss.mean()), 4))
    if args.n_clean_train is not None:
        summary.update(clean_mean=round(float(ref_loss[:args.n_clean_train].mean()), 4),
                       noise_mean=round(float(ref_loss[args.n_clean_train:].mean()), 4))
    log("reference losses of the training stream: " + ", ".join(f"{a} {b:.3f}" for a, b in summary.items()))
    return dict(loss=ref_loss.to(device), info=ref_info, scoring=score_info, summary=summary)


def reference_cost(info: dict, scoring: dict) -> float:
    """Seconds the reference cost: its steps at its measured step time (its uncounted warm-up steps at
    that rate, not their compile time: the full mode's module compiled once for both) + its scoring."""
    counted = max(1, info["steps"] - info.get("warmup_steps", 0))
    return info["train_seconds"] * info["steps"] / counted + scoring["seconds"]
