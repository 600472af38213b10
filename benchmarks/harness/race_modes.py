"""The race's modes and the one training step each runs.

Modes (all start from the same initial weights and read the same sequence of train batches):

* ``full``: the standard step on the whole batch of ``B`` sequences.
* ``random``: the standard step on ``k = clamp(ceil(ratio * B), 1, B)`` rows of that batch, chosen by a
  seeded ``randperm(B)[:k]`` (no library involved).
* ``cggr-<scoring>`` (entropy, margin, loss, combined, predicted): ``cggr_compile.transform(model, ...)``,
  which routes the step to the ``k`` hardest rows by its router's ``scoring``.
* ``cggr-<scoring>-importance``: the same router, ``selection="importance"``: ``k`` rows drawn with
  probability rising with their score (mixed with ``--importance-floor`` of token-count share), each
  drawn row's loss weighted by ``1 / (k p)`` so that the loss estimates the full batch's without bias.
* ``cggr-<scoring>-truncation`` / ``-trim``: loss truncation, ``selection="truncation"``: skip the rows
  scored hardest (the batch's outliers; ``-trim``: a fixed quarter of the batch), then ``k`` uniformly
  among the rest. ``default`` on the command line is the mode of the library's default configuration.
* ``cggr-reducible``, ``cggr-reducible-importance``: learnability (reducible loss = the router's loss
  minus the reference model's, ``harness/references.py``), pretrained regimes only.
* ``cggr-excess`` (race-only experiment, reducible loss in the spirit of RHO-LOSS): the library with a
  user router (``router=``) that returns per-token ``loss_router - loss_reference``: the live router
  (the model's first ``--router-layers`` layers, final norm and head, shared weights) minus a frozen
  snapshot of the same truncated model taken from the race's initial weights (the base model in the
  finetune regimes; a full frozen copy is kept, only its first K layers run). Top-k rows by the mean
  excess. The reference's extra router pass runs inside the step, so the wall-clock budget charges it.

Compilation: with ``--compile`` (the default on cuda) every mode's forward module (the model for
``full`` and ``random``, the transform for ``cggr-*``) is compiled the same way, with CUDA graphs
(``mode="reduce-overhead"``) on cuda. Each mode is built and compiled once per process
(:class:`ModeRunner`); each run copies the initial weights into its parameters in place.

Learning rate (``--lr-rule``): ``full`` uses ``--lr``; the subset modes use ``--lr * sqrt(k / B)``
(``sqrt``: the gradient of a mean over k rows has sqrt(B/k) times the noise of one over B rows),
``--lr * k / B`` (``linear``) or ``--lr`` (``same``); a linear warm-up over ``--lr-warmup-steps``, then
constant; AdamW (betas 0.9/0.95, weight decay on matrices only), gradient norm clipped to ``--grad-clip``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from benchmarks.common import llama_config, require_cggr_compile

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

