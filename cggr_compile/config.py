"""One validated configuration object for every CGGR option.

Every entry point (``transform``, the ``cggr`` backend's ``options=``, the original's classes)
builds a :class:`CGGRConfig`, so an option is checked in exactly one place and its error says
what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .model_layout import ModelCall, RouterSpec

__all__ = ["CGGRConfig", "ModelCall", "RouterSpec", "SCORINGS", "SELECTIONS", "GRANULARITIES"]

SCORINGS = ("entropy", "margin", "loss", "combined", "reducible", "predicted")
SELECTIONS = ("truncation", "topk", "stratified", "sequence_aware", "fixed_quota", "importance")
GRANULARITIES = ("sequences", "tokens")
# Scorings that read the next-token label: without labels they cannot run.
LABEL_SCORINGS = ("loss", "reducible")


@dataclass(frozen=True)
class CGGRConfig:
    """Options of confidence-gated gradient routing (names follow the original library).

    Attributes:
        min_tokens_ratio: share of the batch (sequences) or of the valid tokens (tokens) kept
            once warmup is over, in (0, 1]: exactly that share with the defaults (rounded up to
            one of ``num_levels`` levels); the dynamic threshold, when on, keeps more.
        router_layers: decoder layers the router runs (the model's own first K layers, then its
            final norm and head, or the learned exit); ``1 <= router_layers < num_layers``.
        scoring: token difficulty; default ``predicted`` (``loss`` with a user ``router=``, which gives
            no hidden states): ``entropy``, ``margin``, ``loss``, ``combined`` (SPEC.md),
            ``reducible``: the router's loss minus a reference loss (RHO-LOSS / JEST learnability),
            from ``reference_loss=`` in the batch or from the ``reference`` model; or ``predicted``:
            the learned exit's prediction of the whole model's own loss from the router's hidden
            state (``cggr_compile.exit``), fitted online from the main pass's losses, with no
            vocabulary projection in the router. Until the exit is fitted (``exit_min_fits``) the
            selection is uniform.
        selection: default ``truncation``: skip the rows (tokens) scored hardest, the batch's
            outliers (``truncation_spread``) or a fixed share (``truncation_share``), and draw ``k``
            uniformly among the rest, unweighted (loss truncation: with the learned exit, the rows
            skipped are the ones the model cannot learn; on clean data it skips almost none and is a
            random subset). Also ``topk``, ``stratified``, ``sequence_aware`` (tokens only),
            ``fixed_quota`` or ``importance`` (sequences only: draws ``k`` rows with probability
            rising with their difficulty and weighs each drawn row's loss by ``1 / (k p)``, so the
            loss and its gradient are unbiased estimates of the whole batch's; see
            ``importance_floor``). Top-k and importance by difficulty lean towards hard rows: on
            data with junk rows they train on more junk than a random subset (docs/learnability.md).
        granularity: ``sequences`` (slice the batch: saves compute) or ``tokens`` (selective loss).
        warmup_steps: curriculum length in optimizer steps: the ratio falls linearly from 1 to
            ``min_tokens_ratio`` (the batch is sliced once the ratio's level gives fewer rows than
            ``B``: at step 286 of 1000 for B=8). The schedule advances by itself after each
            optimizer step that updates the model; the first routed step logs what it will do.
        dynamic_threshold: raise the ratio when the router is unsure, to
            ``ratio * (1 + (1 - c) * threshold_sensitivity)`` (at most 1), ``c`` the mean top-1
            probability of the previous step (so no step waits on the device). Off by default, so
            that ``min_tokens_ratio`` is what is kept; on, a fresh model's low confidence can hold
            ``k`` well above it (B=8, 0.25: 4 rows instead of 2). The original library's classes
            (``cggr_compile.CGGRModel``, ``CGGRLoss``) keep the original's default, on; the log line
            at the end of the warmup says what it did.
        threshold_sensitivity: strength of the dynamic threshold, >= 0.
        num_strata: buckets of the stratified selection, >= 1.
        min_tokens_per_sequence: the ``sequence_aware`` floor per sequence, >= 0.
        num_levels: how many distinct ratios (and so batch sizes ``k``) a schedule may use; each
            level compiles once. 1..16.
        importance_floor: ``selection='importance'``: share of the sampling probability spread
            over the rows by their token count rather than by difficulty, in [0, 1]
            (``p_i = (1 - floor) * n_i s_i / sum n s + floor * n_i / N``). 1 is a plain random
            subset; 0 is pure difficulty-proportional sampling (rows of score 0 are never drawn).
        truncation_share: ``selection='truncation'``: None (the default) skips the batch's outliers,
            the rows above ``median + truncation_spread * 1.4826 * MAD`` of their scores; a number in
            [0, 1) skips that share of the rows predicted hardest instead. Never fewer than ``k`` rows
            stay to draw from.
        truncation_spread: the outlier rule's multiple of the robust standard deviation, > 0.
        truncation_probe: ``selection='truncation'``, sequences: the share of the ``k`` rows (rounded
            up, at most ``k - 1``) drawn uniformly from the whole batch, skipped rows included, so
            that the learned exit keeps fitting on what it skips (it fits only on trained rows; fitted
            on kept rows alone it forgets what junk looks like). In [0, 1).
        exit_decay: ``scoring='predicted'``: the factor, in (0, 1], by which the exit's statistics
            decay at each fit (one per training forward, or per micro-batch under the Trainer): they
            weigh about the last ``1 / (1 - exit_decay)`` fits (33 at 0.97, the measured lead).
        exit_ridge: ``scoring='predicted'``: the ridge penalty, > 0, on the exit's weights over
            features scaled to unit second moment (so it does not depend on the hidden state's scale).
        exit_min_fits: ``scoring='predicted'``: fits before the exit ranks rows, >= 1; until then
            (a cold start, a resume without the exit's state) the selection is uniform and the
            metrics' ``exit_ready`` is 0.
        seed: seeds the stratified and importance draws (and the uniform draws of a cold exit).
        fused_scorer: score straight from the router's hidden states with the fused head+scoring
            op (``cggr_compile.ops.fused_scorer``: a Triton kernel on CUDA, chunked torch elsewhere)
            when the head is one linear layer, so the ``B x T x V`` logits are never written.
        fused_loss: the main pass's loss from its final hidden states with the fused head + selective
            cross-entropy op (``cggr_compile.ops.fused_linear_ce``), so its ``rows x T x V`` logits
            are never written: ``True`` (warn, or raise under ``strict``, where the model does not
            allow it), ``"auto"`` (fuse where it can; ``passes/fuse_loss.py`` says why not) or
            ``False``. The training step's output then has ``logits=None`` and the main pass's
            ``last_hidden_state``.
        data_parallel_normalize: under an initialised process group (DDP, FSDP2), divide each
            rank's loss by the selected tokens of all ranks over the world size, so that every
            selected token weighs the same across ranks (``cggr_compile.distributed``).
        strict: raise :class:`~cggr_compile.errors.CGGRFallbackError` instead of warning where CGGR
            cannot route as asked (the backend cannot rewrite a training graph; no truncated router
            for the model), so that a fallback can never train the full batch unnoticed.
        reference: ``scoring='reducible'``: a reference model (a causal or masked LM with the
            model's tokenizer, e.g. the model before fine-tuning, or one fine-tuned briefly on a
            holdout of the training data), run under no-grad inside the routed step; unused when
            the batch carries ``reference_loss=``. Its weights are constants of the step.
        reference_layers: run only the reference's first K layers, final norm and head (a
            truncated reference, like the router); None runs the whole reference model.
        router: optional user router: a callable ``(input_ids, attention_mask) -> logits [B, T, V]``
            or ``-> difficulties [B, T]``; replaces the truncated model.
        router_spec: where a model that is not Hugging Face's keeps its embedding, blocks, final
            norm and head (:class:`cggr_compile.RouterSpec`), for the truncated router;
            None: Hugging Face's layout, else the nanoGPT / torchtitan / litgpt layouts found by
            ``cggr_compile.router.detect_router_spec``.
        model_call: how the model is called and what it returns (:class:`ModelCall`); None: inferred
            from the model (Hugging Face's ``input_ids=`` / ``labels=``, or the detected layout's).
    """

    min_tokens_ratio: float = 0.25
    router_layers: int = 4
    # The defaults (docs/learnability.md): the learned exit predicts each row's loss, truncation
    # skips the batch's outliers (rows the model cannot learn) and draws k uniformly among the rest.
    # On clean data that is a random subset; with junk rows it trains on almost none of them. Rules
    # that lean towards hard rows (top-k, importance by loss) train on more junk than random does.
    scoring: Optional[str] = None  # None: "predicted", or "loss" with a user router=
    selection: Optional[str] = None  # None: "truncation"
    granularity: str = "sequences"
    warmup_steps: int = 1000
    dynamic_threshold: bool = False  # min_tokens_ratio means what it says (the original's classes: True)
    threshold_sensitivity: float = 0.5
    num_strata: int = 4
    min_tokens_per_sequence: int = 1
    num_levels: int = 8
    importance_floor: float = 0.5
    truncation_share: Optional[float] = None
    truncation_spread: float = 3.0
    truncation_probe: float = 0.0625
    exit_decay: float = 0.97
    exit_ridge: float = 1e-3
    exit_min_fits: int = 4
    seed: int = 0
    fused_scorer: bool = True
    fused_loss: Any = False  # False, True or "auto"
    data_parallel_normalize: bool = True
    strict: bool = False
    reference: Optional[Any] = field(default=None, compare=False)
    reference_layers: Optional[int] = None
    router: Optional[Callable[..., Any]] = field(default=None, compare=False)
    router_spec: Optional[RouterSpec] = None
    model_call: Optional[ModelCall] = None

    def __post_init__(self) -> None:
        if self.scoring is None:  # a user router gives no hidden states for the exit to read
            object.__setattr__(self, "scoring", "predicted" if self.router is None else "loss")
        if self.selection is None:
            object.__setattr__(self, "selection", "truncation")
        r = self.min_tokens_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < float(r) <= 1.0):
            raise ValueError(
                f"min_tokens_ratio must be a number in (0, 1], got {r!r}: it is the share of the "
                "batch kept for the backward pass (0.25 keeps a quarter)."
            )
        if self.scoring not in SCORINGS:
            raise ValueError(
                f"unknown scoring {self.scoring!r}; choose one of {', '.join(SCORINGS)}."
            )
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}."
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}; choose 'sequences' (slices the batch, "
                "saves compute) or 'tokens' (selective loss)."
            )
        if self.selection == "sequence_aware" and self.granularity != "tokens":
            raise ValueError(
                "selection='sequence_aware' tops up tokens inside each sequence, so it needs "
                "granularity='tokens'; with granularity='sequences' use 'topk' or 'stratified'."
            )
        if self.selection == "importance" and self.granularity != "sequences":
            raise ValueError(
                "selection='importance' draws whole rows and weighs their loss, so it needs "
                "granularity='sequences'; with granularity='tokens' use 'topk', 'stratified', "
                "'sequence_aware' or 'fixed_quota'."
            )
        f = self.importance_floor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 <= float(f) <= 1.0):
            raise ValueError(
                f"importance_floor must be a number in [0, 1], got {f!r}: it is the share of the "
                "sampling probability given by token count rather than difficulty (1: a random subset)."
            )
        t = self.truncation_share
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) < 1.0):
            raise ValueError(
                f"truncation_share must be None (skip the batch's outliers) or a number in [0, 1), got {t!r}: "
                "the share of the rows (tokens) predicted hardest that truncation skips."
            )
        sp = self.truncation_spread
        if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not float(sp) > 0:
            raise ValueError(
                f"truncation_spread must be a number > 0, got {sp!r}: truncation skips the rows above the "
                "batch's median by more than this many robust standard deviations (3 skips almost nothing "
                "on clean data)."
            )
        pr = self.truncation_probe
        if isinstance(pr, bool) or not isinstance(pr, (int, float)) or not 0.0 <= float(pr) < 1.0:
            raise ValueError(
                f"truncation_probe must be a number in [0, 1), got {pr!r}: the share of the k rows drawn "
                "uniformly from the whole batch, so that the learned exit keeps seeing what truncation skips."
            )
        if isinstance(self.router_layers, bool) or not isinstance(self.router_layers, int) \
                or self.router_layers < 1:
            raise ValueError(
                f"router_layers={self.router_layers!r} is out of range: use an integer with "
                "1 <= router_layers < the model's number of layers."
            )
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("num_strata", self.num_strata, 1)
        _check_int("min_tokens_per_sequence", self.min_tokens_per_sequence, 0)
        _check_int("num_levels", self.num_levels, 1)
        if self.num_levels > 16:
            raise ValueError(
                f"num_levels={self.num_levels} would allow up to that many compilations per "
                "schedule; use at most 16."
            )
        if not isinstance(self.threshold_sensitivity, (int, float)) or self.threshold_sensitivity < 0:
            raise ValueError(
                f"threshold_sensitivity must be a number >= 0, got {self.threshold_sensitivity!r}."
            )
        if not any(self.fused_loss is v if isinstance(v, bool) else self.fused_loss == v
                   for v in (False, True, "auto")):
            raise ValueError(
                f"fused_loss must be False, True or 'auto', got {self.fused_loss!r}: True fuses the main "
                "pass's head with its loss (no logits), 'auto' does so where the model allows it."
            )
        d = self.exit_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < float(d) <= 1.0):
            raise ValueError(f"exit_decay must be a number in (0, 1], got {d!r}: the exit's statistics weigh "
                             "about the last 1 / (1 - exit_decay) fits (1 keeps them all).")
        if isinstance(self.exit_ridge, bool) or not isinstance(self.exit_ridge, (int, float)) \
                or not float(self.exit_ridge) > 0:
            raise ValueError(f"exit_ridge must be a number > 0, got {self.exit_ridge!r}: without a penalty the "
                             "exit's system can be singular.")
        _check_int("exit_min_fits", self.exit_min_fits, 1)
        if self.scoring == "predicted" and self.dynamic_threshold:
            raise ValueError(
                "dynamic_threshold reads the router's confidence (its top-1 probability), and "
                "scoring='predicted' runs no vocabulary head: set dynamic_threshold=False or choose a "
                "head-based scoring."
            )
        if self.reference is not None and self.scoring != "reducible":
            raise ValueError(
                f"reference= is only read by scoring='reducible' (got scoring={self.scoring!r}); "
                "set scoring='reducible' or drop reference=."
            )
        if self.reference is not None and not callable(self.reference):
            raise TypeError(f"reference must be a model (callable), got {type(self.reference).__name__}.")
        if self.reference_layers is not None:
            _check_int("reference_layers", self.reference_layers, 1)
        if self.router is not None and not callable(self.router):
            raise TypeError(
                f"router must be callable (input_ids, attention_mask) -> logits or difficulties, "
                f"got {type(self.router).__name__}."
            )

        if self.model_call is not None and not isinstance(self.model_call, ModelCall):
            raise TypeError(
                f"model_call must be a cggr_compile.ModelCall, got {type(self.model_call).__name__}; "
                "e.g. ModelCall(inputs='idx', labels='targets', labels_shifted=True, ignore_index=-1, "
                "labels_to_model=True, logits_index=0, loss_index=1) for nanoGPT."
            )
        if self.router_spec is not None and not isinstance(self.router_spec, RouterSpec):
            raise TypeError(f"router_spec must be a cggr_compile.RouterSpec, got {type(self.router_spec).__name__}.")

    @property
    def uses_dynamic_threshold(self) -> bool:
        # fixed_quota is topk with the threshold off (SPEC.md, Selection).
        return self.dynamic_threshold and self.selection != "fixed_quota"

    def replace(self, **changes: Any) -> "CGGRConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: Optional[dict] = None, **kwargs: Any) -> "CGGRConfig":
        """Build from a dict (the backend's ``options=``) and/or keywords, rejecting unknown names."""
        merged = dict(options or {})
        merged.update(kwargs)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise TypeError(
                f"unknown CGGR option(s) {', '.join(map(repr, unknown))}; valid options are "
                f"{', '.join(sorted(known))}."
            )
        return cls(**merged)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
