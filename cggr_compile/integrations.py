"""Training frameworks: Hugging Face ``Trainer``, TRL's ``SFTTrainer`` and plain loops.

``enable_cggr(trainer, **options)`` turns CGGR on for a ``transformers.Trainer`` (so for TRL's
``SFTTrainer`` and the other ``Trainer`` subclasses) in one line. One optimizer step of
``G = gradient_accumulation_steps`` micro-batches then flows like this:

1. ``get_batch_samples`` (the Trainer fetches the step's ``G`` micro-batches up front): the router
   scores each micro-batch and picks its rows or tokens (:meth:`CGGRModel.select`: no grad, no
   main pass; every micro-batch of the step is planned from the same schedule state).
   ``D = sum of their selected-token counts`` (a device tensor: no host sync) takes the place of
   the Trainer's ``num_items_in_batch``.
2. ``compute_loss``, per micro-batch in training: the inputs are cut to the selected rows
   (``sequences``) and every label outside the selection becomes -100 (the unselected tokens of
   ``tokens`` granularity, and positions SPEC.md does not count: padding under the attention mask).
   Then the trainer's *own* ``compute_loss`` runs on them with ``num_items_in_batch=D``: the model's
   loss is the sum of the selected tokens' cross-entropy over ``D``, so across the step every
   selected token weighs ``1/D``, exactly one batch of all the selections would give (SPEC.md,
   "Loss and outputs"). Whatever the trainer does there stays as it is: label smoothing,
   ``compute_loss_func``, TRL's fused head and its metrics, a ``torch.compile``-d model (one
   compilation per ``k`` level), accelerate's autocast, gradient checkpointing.
3. ``on_step_end`` (once per optimizer step, never per micro-batch): the schedule advances; its
   counter follows ``trainer.state.global_step``, also after resuming from a checkpoint.
   ``on_save`` writes CGGR's own state beside each checkpoint (``cggr_state.pt``).
4. ``log``: the training logs get ``cggr/*`` entries, means over the logging window, kept as
   device tensors and read once per log (so they reach TensorBoard, W&B, ... like the loss).

Evaluation and prediction (eval mode, no grad) run the trainer's code unchanged: the plain model
on the whole batch.

``scoring="predicted"`` (the learned exit, ``cggr_compile.exit``): neither the Trainer path nor
:func:`route_step` runs CGGR's routed step, so the exit is fitted here, once per micro-batch, right
after its main pass: :meth:`CGGRModel.select` also returns the fit's inputs (the router's hidden
states of the positions that fit, their weights), and the detached per-token cross-entropy of the
model's own logits at those positions (float32, no grad, autocast off, no host sync) goes to
:meth:`CGGRModel.fit_exit`. The main pass's output is seen through a forward hook on the model the
trainer calls, so its ``compute_loss`` runs exactly as before (asking it for ``return_outputs=True``
would not: TRL then recomputes the logits with an extra forward). Under ``sequences`` the fit
covers the trained rows; under ``tokens`` every valid position of the micro-batch (the main pass
computed all of them), scored against the *original* labels, not the relabelled ones (-100 outside
the selection).

Gradient accumulation: one fit per micro-batch, not one per optimizer step. The exit's statistics
are sums (``G = sum w x x^T``, ``m = sum w x y``), so fitting a step's micro-batches one after another
adds up the same evidence as one fit of their union would (up to ``exit_decay``, applied per fit:
its window, the fit counter and ``exit_min_fits`` count micro-batches here), and every micro-batch
of the step was selected from the same exit state before any of them trained (step 1), so no fit
feeds back into its own step's selection.

TRL's fused LM head returns no logits: under ``sequences`` its per-token log-probabilities serve
instead (they score the same labels at every fitted position). Where neither is there (``tokens``
with the fused head, ``logits_to_keep``, a tuple output) the integration warns once and the exit
stays cold (uniform selection); it never crashes. The logs carry ``cggr/exit_*`` too
(:data:`EXIT_METRIC_LOG_KEYS`), and every checkpoint carries CGGR's own state
(``<checkpoint>/cggr_state.pt``: the schedule's step and the exit's statistics, no model
parameter), loaded back by ``trainer.train(resume_from_checkpoint=...)`` before the first step.

For a plain loop, :func:`route_step` does step 1 and 2 for a list of micro-batches (and, with
``scoring="predicted"``, fits the exit after each of their forwards, through a forward hook).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import deque
from collections.abc import Mapping
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from . import scoring as S
from .config import CGGRConfig
from .distributed import data_parallel_world, rank_normaliser
from .exit import FitInputs
from .scoring import IGNORE_INDEX
from .transform import CGGRModel, slice_rows

__all__ = ["enable_cggr", "route_step", "METRIC_LOG_KEYS", "EXIT_METRIC_LOG_KEYS", "SKIP_METRIC_LOG_KEYS",
           "CGGR_STATE_NAME"]

logger = logging.getLogger("cggr_compile")

# The transformers releases the Trainer integration is tested with: pyproject.toml's bound (keep
# the two in step). The Trainer internals it reads (_TrainerInternals) move between releases.
TESTED_TRANSFORMERS = ">=5.23,<5.25"
# Inputs the router never sees (the loss's, or options of the call).
_NOT_FOR_ROUTER = {
    "labels", "shift_labels", "num_items_in_batch", "use_cache", "return_dict", "output_attentions",
    "output_hidden_states", "return_loss", "completion_mask", "assistant_masks", "logits_to_keep",
}
# Metrics kept as device tensors and averaged over micro-batches at log time.
# avg_difficulty is the batch's mean (~0 under scoring='combined', whose scores are z-scores);
# selected_difficulty is the mean over the selected positions: their gap is what the router chose.
_MEAN_KEYS = ("avg_confidence", "avg_entropy", "avg_difficulty", "selected_difficulty")
_PER_STEP_KEYS = ("tokens_selected", "tokens_total")
METRIC_LOG_KEYS = (
    "cggr/step", "cggr/k", "cggr/token_ratio", "cggr/tokens_selected", "cggr/tokens_total",
    "cggr/selected_fraction", "cggr/avg_confidence", "cggr/avg_entropy", "cggr/avg_difficulty",
    "cggr/selected_difficulty",
)
# scoring='predicted' only, beside METRIC_LOG_KEYS (cggr_compile.exit.metrics_of):
# exit_ready is the mean over the window's micro-batches of whether their selection used the exit
# (0 while it is cold: uniform selection); exit_fits, exit_rank_agreement and exit_r2 are the exit's
# own running values at the window's end (the last two are already running means over fits, and
# are left out of a log while they are NaN, i.e. not measured yet: a cold exit, or no fit while ready).
EXIT_METRIC_LOG_KEYS = ("cggr/exit_ready", "cggr/exit_fits", "cggr/exit_rank_agreement", "cggr/exit_r2")
# selection='truncation' only: the mean share of each micro-batch's valid rows (tokens) it skipped as
# too hard (cggr_compile.metrics.skip_metrics; the rows themselves are cg.metrics()["skipped"]).
SKIP_METRIC_LOG_KEYS = ("cggr/skipped_share",)
# Averaged over the window's micro-batches where a step reports them.
_OPTIONAL_MEAN_KEYS = ("exit_ready", "skipped_share")
# CGGR's own state in each Trainer checkpoint folder (CGGRModel.cggr_state_dict: no model parameter).
CGGR_STATE_NAME = "cggr_state.pt"
# The per-token loss of the exit's fit is computed in float32 over chunks of at most this many logits.
_TOKEN_LOSS_CHUNK = 1 << 25


# --------------------------------------------------------------------------------------------
# The shared mechanism: select every micro-batch of a step, then cut and relabel each one.
# --------------------------------------------------------------------------------------------
def _wrappers(model: nn.Module) -> list[nn.Module]:
    """``model`` and the modules it wraps: ``torch.compile`` (``_orig_mod``), DDP/DP (``module``), PEFT."""
    chain = [model]
    for _ in range(8):
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            break
        chain.append(model)
    return chain


def _unwrap(model: nn.Module) -> nn.Module:
    """The module CGGR routes (the innermost of :func:`_wrappers`)."""
    return _wrappers(model)[-1]


def _compiled_with_cggr_backend(model: nn.Module) -> bool:
    """Best effort: was ``model`` compiled with ``backend="cggr"`` (which routes by itself)?"""
    from .backend import cggr_backend, core_of

    if core_of(_unwrap(model)) is not None:
        return True
    ctx = getattr(model, "dynamo_ctx", None)
    obj, frontier = getattr(ctx, "callback", None), []
    for _ in range(8):
        if obj is None:
            break
        if obj is cggr_backend or getattr(obj, "_compiler_name", None) == "cggr" \
                or getattr(obj, "compiler_name", None) == "cggr":
            return True
        frontier += [getattr(obj, a, None) for a in ("_torchdynamo_orig_backend", "compiler_fn", "__wrapped__")]
        frontier = [o for o in frontier if o is not None and o is not obj]
        obj = frontier.pop(0) if frontier else None
    return False


def _relabel(labels: Tensor, weight: Tensor, causal: bool) -> Tensor:
    """``labels`` with -100 everywhere except the targets of the positions in ``weight``.

    ``weight`` is aligned like CGGR's targets (position ``t`` predicts ``labels[t+1]`` in a causal
    LM), so the model's own shifted loss then counts exactly CGGR's selected positions.
    """
    if causal:
        keep = torch.cat([torch.zeros_like(weight[:, :1]), weight[:, :-1]], dim=1)
    else:
        keep = weight
    return torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))


class _Selected:
    """One micro-batch's selection: what the router chose and the metrics of that choice; with
    ``scoring='predicted'`` also what the exit's fit needs once the selection has trained: ``fit``
    (:class:`~cggr_compile.exit.FitInputs`) and ``target`` (the original labels of the fitted positions,
    aligned like the router's targets, -100 where the fit weight is 0)."""

    __slots__ = ("shape", "selection", "weight", "metrics", "fit", "target")

    def __init__(self, shape: torch.Size, selection: Tensor, weight: Tensor, metrics: dict,
                 fit: Optional[FitInputs] = None, target: Optional[Tensor] = None) -> None:
        self.shape, self.selection, self.weight, self.metrics = shape, selection, weight, metrics
        self.fit, self.target = fit, target


def _select(cg: CGGRModel, inputs: dict, record: bool) -> _Selected:
    ids = inputs["input_ids"]
    rest = {k: v for k, v in inputs.items()
            if k not in _NOT_FOR_ROUTER and k not in ("input_ids", "attention_mask")}
    if cg.exit is None:
        selection, weight, metrics = cg.select(ids, inputs.get("attention_mask"), inputs["labels"], record=record,
                                               **rest)
        return _Selected(ids.shape, selection, weight, metrics)
    # select's metrics carry exit_ready: whether this selection ranked by the exit.
    selection, weight, metrics, fit = cg.select(ids, inputs.get("attention_mask"), inputs["labels"], record=record,
                                                return_fit_inputs=True, **rest)
    return _Selected(ids.shape, selection, weight, metrics, fit, _fit_target(cg, inputs["labels"], selection, fit))


def _fit_target(cg: CGGRModel, labels: Tensor, selection: Tensor, fit: FitInputs) -> Tensor:
    """The label each fitted position is scored against: the micro-batch's *original* labels (not the
    relabelled ones, -100 outside a token selection), aligned like the router's targets (a causal LM's
    position ``t`` against ``labels[t+1]``), of the trained rows (``sequences``) or of every row
    (``tokens``); -100 wherever the fit weight is 0 (padding, prompt tokens, the last position)."""
    target = S.aligned_labels(cg._cggr_labels(labels), cg.causal)
    if cg.cggr_config.granularity == "sequences":
        target = target.index_select(0, selection)
    return torch.where(fit.weight > 0, target, torch.full_like(target, IGNORE_INDEX))


def _logits_token_loss(logits: Tensor, target: Tensor) -> Tensor:
    """The detached per-token cross-entropy ``[rows, T]`` of ``logits`` ``[rows, T, V]`` against
    ``target`` (0 at -100), in float32, over chunks of positions (the float32 copy of the logits
    never exceeds :data:`_TOKEN_LOSS_CHUNK` values). No grad, no host sync."""
    with torch.no_grad():
        v = logits.shape[-1]
        flat, t = logits.detach().reshape(-1, v), target.reshape(-1)
        step = max(1, _TOKEN_LOSS_CHUNK // max(v, 1))
        parts = [
            nn.functional.cross_entropy(flat[i:i + step].float(), t[i:i + step], ignore_index=IGNORE_INDEX,
                                        reduction="none")
            for i in range(0, flat.shape[0], step)
        ]
        return torch.cat(parts).view(target.shape)


def _output_field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None) if not isinstance(outputs, (tuple, list)) else None


def _token_loss(cg: CGGRModel, sel: _Selected, outputs: Any) -> tuple[Optional[Tensor], str]:
    """The main pass's detached per-token loss at the exit's fitted positions (``[rows, T]``, aligned
    like ``sel.target``), from the output's logits; else, under ``sequences``, from TRL's fused head's
    per-token log-probabilities (the same labels at every fitted position: the relabelling only
    drops positions of fit weight 0). Returns ``(None, why)`` where neither is there."""
    target = sel.target
    logits = outputs if isinstance(outputs, Tensor) else _output_field(outputs, "logits")
    if isinstance(logits, Tensor):
        if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(target.shape):
            return _logits_token_loss(logits, target), ""
        return None, (f"its logits have shape {tuple(logits.shape)}, not one row per position of the "
                      f"trained rows {tuple(target.shape)} (logits_to_keep?)")
    log_probs = _output_field(outputs, "log_probs")
    if isinstance(log_probs, Tensor) and log_probs.dim() == 2:
        if cg.cggr_config.granularity != "sequences":
            return None, ("it has no logits, only per-token log-probabilities of the relabelled tokens (TRL's "
                          "fused head), which granularity='tokens' leaves at -100 outside the selection")
        rows, t = target.shape
        with torch.no_grad():
            loss = -log_probs.detach().float()
            if cg.causal and tuple(loss.shape) == (rows, t - 1):  # position t scored against label t+1
                loss = torch.cat([loss, torch.zeros_like(loss[:, :1])], dim=1)
            if tuple(loss.shape) == (rows, t):
                return torch.where(target != IGNORE_INDEX, loss, torch.zeros_like(loss)), ""
        return None, f"its per-token log-probabilities have shape {tuple(log_probs.shape)}, not {(rows, t)}"
    what = type(outputs).__name__
    return None, f"the training forward returned a {what} without logits"


def _fit_exit(cg: CGGRModel, sel: _Selected, outputs: list, warn: Any) -> Optional[dict]:
    """Fit the learned exit on a micro-batch that has just trained (``outputs``: the outputs, or
    logits, of the model's forwards in its main pass; the first that gives the per-token loss
    serves): one fit per micro-batch. Returns
    the exit's metrics (device tensors), or None (and ``warn(key, message)`` once) where no output
    carries the per-token loss."""
    if sel.fit is None:
        return None
    token_loss, why = None, "the model was not called"
    for out in outputs:
        token_loss, why = _token_loss(cg, sel, out)
        if token_loss is not None:
            break
    if token_loss is None:
        warn("exit-no-logits", (
            f"cggr: scoring='predicted' cannot fit its learned exit in this setup: {why}. The exit stays cold, so "
            "the selection stays uniform (cggr/exit_ready 0). Let the training forward return the full logits "
            "(no logits_to_keep), or with TRL's fused LM head use granularity='sequences' (its per-token "
            "log-probabilities then serve), or choose a head-based scoring (e.g. scoring='loss')."
        ))
        return None
    # The agreement metrics compare the exit's prediction, before this fit, with these losses, counted
    # when that exit was ready. Under accumulation an earlier micro-batch of this step has fitted since
    # the selection predicted: predict again from the state this fit updates, so that prediction and
    # readiness are the same exit's (still out of sample). No sync; the exit works in float32 itself.
    fit = sel.fit
    with torch.no_grad():
        predicted = cg.exit.predict(cg.exit.state_on(token_loss.device), fit.hidden)
    fit = fit._replace(predicted=torch.where(fit.weight > 0, predicted, torch.zeros_like(predicted)))
    metrics = cg.fit_exit(fit, token_loss)
    # The step's own metrics (cg.metrics() after its last micro-batch): the fit's running values;
    # exit_ready stays the selection's (whether it used the exit).
    sel.metrics.update({k: v for k, v in metrics.items() if k != "exit_ready"})
    return metrics


def _cut(cg: CGGRModel, inputs: dict, sel: _Selected) -> dict:
    """The micro-batch as the main pass sees it: selected rows, labels only on selected tokens."""
    out = dict(inputs)
    b = inputs["input_ids"].shape[0]
    if cg.cggr_config.granularity == "sequences" and sel.selection.shape[0] < b:
        idx = sel.selection
        out = {k: slice_rows(v, idx, b) for k, v in out.items()}
    out.pop("reference_loss", None)  # read by the router (scoring='reducible'), never by the model
    out["labels"] = _relabel(out["labels"], sel.weight, cg.causal)
    if isinstance(out.get("shift_labels"), Tensor):
        out["shift_labels"] = torch.where(sel.weight, out["shift_labels"], torch.full_like(out["shift_labels"], IGNORE_INDEX))
    return out


def _check_selection(cg: CGGRModel) -> None:
    """The model's own loss counts labelled tokens; it cannot carry importance weights."""
    if cg.cggr_config.selection == "importance":
        raise ValueError(
            "cggr: selection='importance' weighs each drawn row's loss by 1/(k p), which the model's own "
            "loss (labels and num_items_in_batch) cannot express; use cggr_compile.transform(model, "
            "selection='importance') in your own loop, or another selection here."
        )


def _routable(inputs: Any) -> bool:
    return isinstance(inputs, Mapping) and isinstance(inputs.get("labels"), Tensor) \
        and isinstance(inputs.get("input_ids"), Tensor)


def _select_step(cg: CGGRModel, micro_batches: list[dict]) -> tuple[list[_Selected], Any]:
    """Select every micro-batch of one optimizer step, then record their metrics: all of them are
    planned from the same schedule state. Also returns the step's loss denominator, the sum of their
    selected-token counts (a device tensor: no host sync)."""
    sels = [_select(cg, b, record=False) for b in micro_batches]
    for s in sels:
        cg.record_step(s.metrics)
    return sels, sum(s.metrics["tokens_selected"] for s in sels)


def _rank_normalised(cg: CGGRModel, total: Any) -> Any:
    """``total`` as CGGR's data-parallel count (``cggr_compile.distributed``) when ranks average
    their gradients (DDP/FSDP), so every selected token of every rank weighs the same."""
    if cg.cggr_config.data_parallel_normalize and data_parallel_world() > 1:
        return rank_normaliser(total)
    return total


def route_step(cg: CGGRModel, micro_batches: Iterable[dict], num_items_key: str = "num_items_in_batch") -> list[dict]:
    """CGGR for the micro-batches of one optimizer step, in a plain loop.

    Runs the router on every micro-batch first (no grad), then returns each micro-batch cut to its
    selected rows, its labels -100 outside the selected tokens, and ``num_items_key`` set to the
    selected tokens of *all* of them (a device tensor). A Hugging Face causal LM (transformers'
    ``ForCausalLMLoss``) divides its summed loss by ``num_items_in_batch``, so ``model(**inputs).loss``
    summed over the step weighs every selected token the same, as one batch of all the selections
    would (a model whose loss ignores the count needs its own loss: the sum of its selected tokens'
    cross-entropy over that count). Under an initialised process group the count is CGGR's
    data-parallel one (``cggr_compile.distributed``). Call ``cg.step()`` after each optimizer step.
    In eval, or for a batch without labels, use the model as usual.

    ``scoring='predicted'``: every micro-batch is selected from the same exit state, then the exit
    fits once per micro-batch, right after the model's training forward on the dict returned here (a
    forward hook on ``cg.model`` recognises its ``input_ids``; the per-token loss comes from the
    output's logits, under ``tokens`` against the original labels). Call the model on the returned
    dicts as they are; a micro-batch whose forward was never seen warns at the next ``route_step``.
    """
    _check_selection(cg)
    batches = [dict(b) for b in micro_batches]
    sels, total = _select_step(cg, batches)
    total = _rank_normalised(cg, total)
    routed = [{**_cut(cg, b, s), num_items_key: total} for b, s in zip(batches, sels)]
    if cg.exit is not None:
        _RouteStepFits.of(cg).expect([(r["input_ids"], s) for r, s in zip(routed, sels)])
    return routed


@contextlib.contextmanager
def _forward_outputs(model: nn.Module) -> Any:
    """While inside, the outputs of ``model``'s forwards (a list, filled as they return), seen by a
    forward hook on the module the trainer calls (a DDP or ``torch.compile`` wrapper included: the
    hook runs outside the compiled region)."""
    seen: list = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


class _RouteStepFits:
    """``route_step`` with ``scoring='predicted'``: fits the learned exit after each routed micro-batch's
    forward, through a forward hook on ``cg.model`` (the loop runs the main pass itself, and the
    README's loop needs no change). A training forward (``model.training``, grad enabled) whose
    ``input_ids`` is the very tensor ``route_step`` handed out is that micro-batch's main pass: its
    logits give the per-token loss, one fit per micro-batch. The hook is removed once every
    micro-batch of the step has fitted (it breaks a ``torch.compile`` graph while it is there: the
    fit runs eagerly); micro-batches never seen (inputs copied or moved after ``route_step``, a
    wrapper that calls ``forward`` directly) are reported at the next ``route_step``."""

    def __init__(self, cg: CGGRModel) -> None:
        self.cg = cg
        self.pending: list[tuple[Tensor, _Selected]] = []
        self.handle: Any = None
        self._warned: set[str] = set()

    @classmethod
    def of(cls, cg: CGGRModel) -> "_RouteStepFits":
        fits = cg.__dict__.get("_cggr_route_step_fits")
        if fits is None:
            fits = cg.__dict__["_cggr_route_step_fits"] = cls(cg)
        return fits

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def expect(self, entries: list[tuple[Tensor, _Selected]]) -> None:
        if self.pending:
            self.warn_once("unfitted", (
                f"cggr: route_step: the learned exit was not fitted on {len(self.pending)} micro-batch(es) of the "
                "previous step: no training forward of the model saw the input_ids route_step returned. Call the "
                "model (the one transform() wrapped, or its DDP/compiled wrapper) on the routed dicts as they are, "
                "in training mode with grad enabled; without fits the exit stays cold and the selection uniform."
            ))
        self.pending = list(entries)
        if self.handle is None:
            self.handle = self.cg.model.register_forward_hook(torch.compiler.disable(self._hook), with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (self.pending and module.training and torch.is_grad_enabled()):
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        for i, (expected, sel) in enumerate(self.pending):
            if expected is ids:
                del self.pending[i]
                _fit_exit(self.cg, sel, [output], self.warn_once)
                break
        if not self.pending and self.handle is not None:
            self.handle.remove()
            self.handle = None
        return None


# --------------------------------------------------------------------------------------------
# transformers.Trainer (and TRL's SFTTrainer)
# --------------------------------------------------------------------------------------------
def _transformers_version() -> str:
    import transformers

    return str(getattr(transformers, "__version__", "unknown"))


def _check_transformers_version() -> None:
    """Warn when transformers is outside the tested range: the Trainer internals may have moved."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = _transformers_version()
    try:
        inside = SpecifierSet(TESTED_TRANSFORMERS).contains(Version(found), prereleases=True)
    except InvalidVersion:
        inside = False
    if not inside:
        warnings.warn(
            f"cggr: enable_cggr is tested with transformers{TESTED_TRANSFORMERS}, this is {found}; it reads "
            "Trainer internals that change between releases. If training fails or its loss looks wrong, "
            f"install a tested release: pip install 'transformers{TESTED_TRANSFORMERS}'.",
            stacklevel=4,
        )


class _TrainerInternals:
    """Every ``Trainer`` attribute the integration reads, in one place.

    Several are private or differ between transformers releases (``loss_is_scaled_for_ga``,
    ``_loss_shifts_labels``, ``current_gradient_accumulation_steps``, ``_signature_columns``, ...):
    a release that renames one needs a change here only. Creating it checks that ``trainer`` is a
    ``Trainer`` and warns when transformers is outside :data:`TESTED_TRANSFORMERS`.
    """

    PATCHED = ("get_batch_samples", "compute_loss", "log", "train")

    def __init__(self, trainer: Any) -> None:
        for name in self.PATCHED + ("add_callback", "model", "args"):
            if not hasattr(trainer, name):
                raise TypeError(f"cggr: enable_cggr expects a transformers.Trainer (it has no {name!r}).")
        _check_transformers_version()
        self.trainer = trainer

    def _required(self, name: str) -> Any:
        """An attribute with no safe default: without it the loss scaling cannot be decided."""
        try:
            return getattr(self.trainer, name)
        except AttributeError:
            raise AttributeError(
                f"cggr: this Trainer (transformers {_transformers_version()}) has no {name!r}, which "
                f"enable_cggr reads to scale the loss like the Trainer does; install a tested release: "
                f"pip install 'transformers{TESTED_TRANSFORMERS}'."
            ) from None

    # -- the trainer's methods ----------------------------------------------------------------
    def replace_method(self, name: str, method: Any) -> Any:
        """Put ``method`` in place of the trainer's ``name``; returns the trainer's own."""
        own = getattr(self.trainer, name)
        setattr(self.trainer, name, method)
        return own

    def add_callback(self, callback: Any) -> None:
        self.trainer.add_callback(callback)

    def keep_column(self, column: str) -> None:
        """Keep ``column`` in the batches: the Trainer drops dataset columns its model's forward does
        not name (``remove_unused_columns``), and the router reads this one."""
        trainer = self.trainer
        fill = getattr(trainer, "_set_signature_columns_if_needed", None)
        if fill is None:
            return

        def set_signature_columns_if_needed() -> None:
            fill()
            if trainer._signature_columns is not None and column not in trainer._signature_columns:
                trainer._signature_columns.append(column)

        trainer._set_signature_columns_if_needed = set_signature_columns_if_needed

    # -- state and arguments ------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        return int(getattr(self.trainer.state, "global_step", 0) or 0)

    @property
    def device(self) -> torch.device:
        return self.trainer.args.device

    @property
    def accumulation_steps(self) -> int:
        """The micro-batches of the current optimizer step (the last step of an epoch may have fewer)."""
        return int(getattr(self.trainer, "current_gradient_accumulation_steps", 1) or 1)

    @property
    def world_size(self) -> int:
        return getattr(self.trainer.args, "world_size", 1)

    @property
    def output_dir(self) -> str:
        return str(self.trainer.args.output_dir)

    def checkpoint_dir(self, global_step: int) -> str:
        """The folder ``Trainer._save_checkpoint`` wrote for ``global_step`` (its run directory: the
        output directory, or a hyperparameter-search trial's folder in it)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        t = self.trainer
        run_dir = self.output_dir
        get = getattr(t, "_get_output_dir", None)
        if callable(get):
            with contextlib.suppress(Exception):
                run_dir = get(trial=getattr(t, "_trial", None))
        return os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")

    def resolve_checkpoint(self, resume_from_checkpoint: Any) -> Optional[str]:
        """The checkpoint folder ``Trainer.train(resume_from_checkpoint=...)`` resumes from: a path, or
        for ``True`` the last one in the output directory (None: no resume, or none found, which
        the Trainer itself reports)."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            return get_last_checkpoint(self.output_dir) if os.path.isdir(self.output_dir) else None
        return str(resume_from_checkpoint)

    @property
    def averages_tokens_across_devices(self) -> bool:
        return bool(getattr(self.trainer.args, "average_tokens_across_devices", False))

    # -- accelerate ---------------------------------------------------------------------------
    def autocast(self) -> Any:
        """The trainer's autocast (accelerate's mixed precision), so the router runs like the model."""
        acc = getattr(self.trainer, "accelerator", None)
        if acc is not None and hasattr(acc, "autocast"):
            return acc.autocast()
        return contextlib.nullcontext()

    def sum_over_ranks(self, total: Tensor) -> Tensor:
        return self.trainer.accelerator.gather(total.reshape(1)).sum()

    def loss_processes(self) -> int:
        """What ``Trainer.compute_loss`` multiplies a token-averaged loss by: the data-parallel ranks
        (processes over tensor-parallel size)."""
        t = self.trainer
        tp = t.get_tp_size() if hasattr(t, "get_tp_size") else 1
        return t.accelerator.num_processes // tp

    # -- how the trainer's loss treats num_items_in_batch --------------------------------------
    def loss_uses_num_items(self) -> bool:
        """Whether the trainer's own ``compute_loss`` normalises by ``num_items_in_batch``.

        True for a subclass that computes its own loss (TRL's trainers), a ``compute_loss_func``,
        label smoothing, and a causal LM whose loss is transformers' ``ForCausalLMLoss``. Other
        models (BERT's masked LM takes ``**kwargs`` but ignores the count) get CGGR's loss from their
        logits instead.
        """
        from transformers import Trainer

        t = self.trainer
        if type(t).compute_loss is not Trainer.compute_loss:
            return True
        if self._required("compute_loss_func") is not None or getattr(t, "label_smoother", None) is not None:
            return True
        return bool(self._required("model_accepts_loss_kwargs") and getattr(t, "_loss_shifts_labels", False))

    def loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` takes ``compute_loss``'s loss as already scaled for gradient
        accumulation (else it divides it by the accumulation steps); ``num_items_in_batch`` is what
        ``training_step`` passed."""
        scaled = getattr(self.trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:  # transformers' rule in training_step
            scaled = (self._required("model_accepts_loss_kwargs") and num_items_in_batch is not None) \
                or self._required("compute_loss_func") is not None
        return bool(scaled)


class _MetricsWindow:
    """The ``cggr/*`` log entries of one logging window: sums over its micro-batches, kept as
    device tensors and read once per log (no host sync per micro-batch)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.micro = 0
        self.steps = 0
        self.k_sum = 0.0
        self.ratio_sum = 0.0
        # scoring='predicted': the exit's running values after the window's last fit (device tensors)
        self.exit_latest: dict[str, Tensor] = {}

    def add(self, m: dict) -> None:
        """One micro-batch's metrics."""
        self.micro += 1
        self.k_sum += float(m.get("k", 0))
        self.ratio_sum += float(m.get("token_ratio", 0.0))
        for key in _MEAN_KEYS + _PER_STEP_KEYS + _OPTIONAL_MEAN_KEYS:
            v = m.get(key)
            if isinstance(v, Tensor):
                v = v.detach().to(torch.float32)
                self.sums[key] = v if key not in self.sums else self.sums[key] + v

    def add_exit_fit(self, m: dict) -> None:
        """One fit's exit metrics (``cggr_compile.exit.fit``): the latest running values are logged."""
        for key in ("exit_fits", "exit_rank_agreement", "exit_r2"):
            if isinstance(m.get(key), Tensor):
                self.exit_latest[key] = m[key].detach()

    def end_step(self) -> None:
        """One optimizer step's micro-batches are in (per-step entries are means over steps)."""
        self.steps += 1

    def read(self, schedule_step: int) -> dict[str, float]:
        """The window's means, then a new window (this is the one place that reads the device tensors)."""
        if self.micro == 0:
            return {}
        values = {k: float(v) for k, v in self.sums.items()}
        steps = max(self.steps, 1)
        out = {
            "cggr/step": float(schedule_step),
            "cggr/k": self.k_sum / self.micro,
            "cggr/token_ratio": self.ratio_sum / self.micro,
        }
        for key in _PER_STEP_KEYS:
            if key in values:
                out[f"cggr/{key}"] = values[key] / steps
        if "tokens_selected" in values and values.get("tokens_total"):
            out["cggr/selected_fraction"] = values["tokens_selected"] / values["tokens_total"]
        for key in _MEAN_KEYS + _OPTIONAL_MEAN_KEYS:
            if key in values:
                out[f"cggr/{key}"] = values[key] / self.micro
        for key, v in self.exit_latest.items():
            value = float(v)
            if value == value:  # NaN: not measured yet (a cold exit, or no fit while ready): left out
                out[f"cggr/{key}"] = value
        self.reset()
        return out


def _callback(integration: "_TrainerIntegration") -> Any:
    """A ``TrainerCallback`` that advances the schedule once per optimizer step (``on_step_end``) and
    writes CGGR's own state into each checkpoint folder (``on_save``)."""
    from transformers import TrainerCallback

    class CGGRTrainerCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            integration.cggr.step()
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            integration.save_state(args, state)
            return control

    return CGGRTrainerCallback()


class _TrainerIntegration:
    """The state ``enable_cggr`` attaches to a trainer (``trainer._cggr``), and the trainer methods
    it puts in place (:meth:`install`)."""

    def __init__(self, internals: _TrainerInternals, cg: CGGRModel) -> None:
        self.internals = internals
        self.cggr = cg
        self.pending: deque[Optional[_Selected]] = deque()
        self.on_the_fly = 0  # micro-batches routed inside compute_loss (no pending selection)
        self.window = _MetricsWindow()
        self._warned: set[str] = set()
        self.orig: dict[str, Any] = {}

    def install(self) -> None:
        """Patch the trainer's methods (keeping its own in ``orig``) and add the schedule's callback."""
        for name in _TrainerInternals.PATCHED:
            self.orig[name] = self.internals.replace_method(name, getattr(self, name))
        self.internals.add_callback(_callback(self))

    def log_entries(self) -> dict[str, float]:
        """The logging window's ``cggr/*`` means (see :class:`_MetricsWindow`)."""
        return self.window.read(self.cggr.schedule.step)

    # -- helpers ------------------------------------------------------------------------------
    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _to_device(self, inputs: dict) -> dict:
        device = self.internals.device
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    def _sync_schedule(self) -> None:
        """The schedule counts optimizer steps: follow the trainer's (a resume, a second train())."""
        step = self.internals.global_step
        if self.cggr.schedule.step != step:
            self.cggr.schedule.set_step(step)

    def _check_rows(self, shape: torch.Size) -> None:
        if self.cggr.cggr_config.granularity == "sequences" and shape[0] == 1:
            self.warn_once("one-row", (
                "cggr: the training batches have one row (padding-free or packed into one sequence), so "
                "selecting sequences keeps all of it and saves nothing; use granularity='tokens' (selective "
                "loss) or batches of several rows (e.g. TRL's packing_strategy='wrapped')."
            ))

    def _route(self, micro_batches: list[dict]) -> tuple[list[_Selected], Any]:
        """:func:`_select_step` under the trainer's autocast, with the window's metrics."""
        with torch.no_grad(), self.internals.autocast():
            sels, total = _select_step(self.cggr, micro_batches)
        for s in sels:
            self._check_rows(s.shape)
            self.window.add(s.metrics)
        return sels, total

    def _denominator(self, total: Tensor) -> Tensor:
        """Across data-parallel ranks (not tested here: one process).

        With ``average_tokens_across_devices`` (the default) like the Trainer's own count: the sum
        over ranks (the Trainer then multiplies the loss by the number of processes). Without it,
        CGGR's own rule (``cggr_compile.distributed``): the sum over ranks divided by the world.
        """
        t = self.internals
        if t.world_size > 1:
            if t.averages_tokens_across_devices:
                return t.sum_over_ranks(total)
            return _rank_normalised(self.cggr, total)
        return total

    # -- patched trainer methods --------------------------------------------------------------
    def get_batch_samples(self, *args: Any, **kwargs: Any) -> tuple[list, Any]:
        batch_samples, num_items = self.orig["get_batch_samples"](*args, **kwargs)
        self.pending.clear()
        if not batch_samples or not all(_routable(b) for b in batch_samples):
            self.pending.extend([None] * len(batch_samples))
            return batch_samples, num_items
        self._sync_schedule()
        sels, total = self._route([self._to_device(b) for b in batch_samples])
        self.window.end_step()
        self.pending.extend(sels)
        return batch_samples, self._denominator(total)

    def compute_loss(
        self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        orig = self.orig["compute_loss"]
        if not (_routable(inputs) and model.training and torch.is_grad_enabled()):
            return orig(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs)
        passed = num_items_in_batch  # what training_step decides the GA scaling from
        sel = self.pending.popleft() if self.pending else None
        if sel is None or tuple(sel.shape) != tuple(inputs["input_ids"].shape):
            # Not fetched through get_batch_samples (a custom loop calling training_step): route now
            # and weigh this micro-batch as 1/G of the step, like the Trainer's own fallback.
            self.pending.clear()
            self.on_the_fly += 1
            (sel,), selected = self._route([inputs])
            if num_items_in_batch is not None:
                num_items_in_batch = selected * self.internals.accumulation_steps
        cut = _cut(self.cggr, inputs, sel)
        if self.internals.loss_uses_num_items():
            if sel.fit is None:
                return orig(model, cut, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs)
            # scoring='predicted': the exit fits on this main pass's output. Seen through a forward hook on
            # the model the trainer calls, not by asking compute_loss for return_outputs=True, which would
            # change what runs (TRL then recomputes the logits with an extra forward, and warns).
            with _forward_outputs(model) as outputs:
                result = orig(model, cut, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch,
                              **kwargs)
            self._fit_exit(sel, outputs)
            return result
        return self._own_loss(model, cut, return_outputs, num_items_in_batch, passed, sel)

    def _fit_exit(self, sel: _Selected, outputs: list) -> None:
        """``scoring='predicted'``: the exit's fit on a micro-batch that has just trained (one per micro-batch)."""
        metrics = _fit_exit(self.cggr, sel, outputs, self.warn_once)
        if metrics is not None:
            self.window.add_exit_fit(metrics)

    def _own_loss(self, model: nn.Module, cut: dict, return_outputs: bool, denominator: Any, passed: Any,
                  sel: Optional[_Selected] = None) -> Any:
        """CGGR's loss from the model's logits, scaled like the Trainer expects it."""
        t = self.internals
        labels = cut.pop("labels")
        cut.pop("shift_labels", None)
        outputs = model(**cut)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if sel is not None and sel.fit is not None:
            self._fit_exit(sel, [logits])
        target = S.aligned_labels(labels, self.cggr.causal)
        loss = S.selective_cross_entropy(logits, target, target != IGNORE_INDEX, denominator)
        if denominator is not None and not t.loss_is_scaled_for_ga(passed):
            loss = loss * t.accumulation_steps  # training_step will divide by the accumulation steps: undo that
        if t.averages_tokens_across_devices and t.world_size > 1 and passed is not None:
            loss = loss * t.loss_processes()  # the count is the ranks' sum and DDP averages: as Trainer.compute_loss
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> Any:
        if "loss" in logs and not any(str(k).startswith("eval_") for k in logs):
            logs.update(self.log_entries())
        return self.orig["log"](logs, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``: on a resume, CGGR's own state comes back from the checkpoint before the
        first step (:meth:`load_state`); then the trainer's own ``train``."""
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        checkpoint = self.internals.resolve_checkpoint(resume)
        if checkpoint is not None:
            self.load_state(checkpoint)
        return self.orig["train"](*args, **kwargs)

    # -- CGGR's own state in the Trainer's checkpoints ------------------------------------------
    def save_state(self, args: Any, state: Any) -> None:
        """``on_save``: ``cg.cggr_state_dict()`` (the schedule's step, the learned exit's statistics; no
        model parameter) into the checkpoint folder just written, as :data:`CGGR_STATE_NAME`. Written
        where the Trainer writes its own state (``args.should_save``: the main process). Under data
        parallelism each rank's exit fits its own rows; the checkpoint keeps the main process's, and a
        resume gives it to every rank."""
        if not getattr(args, "should_save", True):
            return
        folder = self.internals.checkpoint_dir(int(getattr(state, "global_step", 0) or 0))
        if not os.path.isdir(folder):
            self.warn_once("no-checkpoint-folder", (
                f"cggr: no checkpoint folder at {folder}, so CGGR's state (schedule step, learned exit) is not saved "
                "with this checkpoint; a resume from it starts the exit cold."
            ))
            return
        torch.save(self.cggr.cggr_state_dict(), os.path.join(folder, CGGR_STATE_NAME))

    def load_state(self, checkpoint: str) -> None:
        """Restore CGGR's state from ``checkpoint`` (before the first resumed step). The schedule's
        step also follows ``trainer.state.global_step`` at every step (:meth:`_sync_schedule`); the two
        agree, since the file is written after the step's ``on_step_end``. Without the file (a
        checkpoint of a run without it) the learned exit starts cold: uniform selection until it has
        ``exit_min_fits`` fits again (said once in the log)."""
        path = os.path.join(checkpoint, CGGR_STATE_NAME)
        cg = self.cggr
        if os.path.isfile(path):
            cg.load_cggr_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return
        if cg.exit is not None:
            # Not the in-memory exit of an earlier train() either: it was fitted on other weights.
            cg.load_cggr_state_dict({"exit": {"hidden": cg.exit.layout.hidden, "state": None}})
            logger.info(
                "cggr: %s has no %s, so the learned exit (scoring='predicted') starts cold: the selection is uniform "
                "until it has refitted, within exit_min_fits=%d micro-batches (cggr/exit_ready says when).",
                checkpoint, CGGR_STATE_NAME, cg.cggr_config.exit_min_fits,
            )


def enable_cggr(trainer: Any, config: Optional[CGGRConfig] = None, **options: Any) -> CGGRModel:
    """Train ``trainer`` (a ``transformers.Trainer``, TRL's ``SFTTrainer``, ...) with CGGR.

    One call after building the trainer, before ``trainer.train()``::

        trainer = SFTTrainer(model=model, args=args, train_dataset=ds)
        cggr_compile.enable_cggr(trainer, min_tokens_ratio=0.25, router_layers=4)
        trainer.train()

    ``options`` are :func:`cggr_compile.transform`'s. The model may be compiled with
    ``torch.compile`` (or ``TrainingArguments(torch_compile=True)``) with any backend but
    ``"cggr"`` (which routes by itself: compile with the default backend instead), use gradient
    checkpointing and bf16/fp16 mixed precision. Returns the :class:`CGGRModel` that holds the
    router and the schedule (``.schedule.step``, ``.metrics()``); it shares the model's parameters.
    Gradient accumulation: every selected token of the optimizer step weighs the same (see this
    module's docstring). Evaluation runs the plain model on the whole batch.

    ``scoring="predicted"`` (the learned exit, ``cggr_compile.exit``): the exit is fitted
    here, after each micro-batch's main pass, from the detached per-token cross-entropy of the
    model's logits at the trained positions (every valid position under ``granularity="tokens"``).
    Under gradient accumulation that is one fit per micro-batch: the exit's statistics are additive
    (decayed sums), so consecutive fits add up what one fit of the whole step would (up to the
    per-fit decay: ``exit_decay`` and ``exit_min_fits`` count micro-batches), and every micro-batch
    of the step was selected from the same exit state before any of them trained. The default
    selection, truncation, trains its rows unweighted (so the model's own loss serves) and fits the
    exit with each row weighted by the inverse of its chance of being drawn. Until ``exit_min_fits`` fits the selection is uniform
    (``cggr/exit_ready`` 0). The logs add :data:`EXIT_METRIC_LOG_KEYS`. Where the training forward
    returns no logits (``logits_to_keep``; TRL's fused head under ``tokens``: under ``sequences`` its
    per-token log-probabilities serve) it warns once and the exit stays cold.

    Checkpoints: each checkpoint folder gets :data:`CGGR_STATE_NAME` (``cg.cggr_state_dict()``:
    the schedule's step and the exit's statistics, no model parameter), and
    ``trainer.train(resume_from_checkpoint=...)`` loads it before the first step. A checkpoint
    without it resumes with a cold exit (an info line says so) and the schedule at the checkpoint's
    ``global_step``.
    """
    if getattr(trainer, "_cggr", None) is not None:
        raise ValueError("cggr: CGGR is already enabled on this trainer.")
    internals = _TrainerInternals(trainer)
    model = trainer.model
    if any(isinstance(m, CGGRModel) for m in _wrappers(model)):
        raise ValueError(
            "cggr: the trainer's model is already a CGGR model (cggr_compile.transform), which routes every "
            "training step by itself; give the Trainer the plain model and let enable_cggr route."
        )
    if _compiled_with_cggr_backend(model):
        raise ValueError(
            "cggr: this model is compiled with backend='cggr', which routes every training step by itself; "
            "enable_cggr routes in the trainer. Compile with the default backend (torch.compile(model) or "
            "TrainingArguments(torch_compile=True)) and pass the CGGR options to enable_cggr."
        )
    cg = CGGRModel(_unwrap(model), config, **options)
    # The trainer's callback advances the schedule, following its global_step (resume included),
    # not the optimizer's hook.
    cg.schedule.auto = False
    _check_selection(cg)
    integration = _TrainerIntegration(internals, cg)
    integration.install()
    if cg.cggr_config.scoring == "reducible":
        internals.keep_column("reference_loss")
    trainer._cggr = integration
    return cg

