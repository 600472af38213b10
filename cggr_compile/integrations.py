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
4. ``log``: the training logs get ``cggr/*`` entries, means over the logging window, kept as
   device tensors and read once per log (so they reach TensorBoard, W&B, ... like the loss).

Evaluation and prediction (eval mode, no grad) run the trainer's code unchanged: the plain model
on the whole batch.

For a plain loop, :func:`route_step` does step 1 and 2 for a list of micro-batches.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import deque
from collections.abc import Mapping
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from . import scoring as S
from .config import CGGRConfig
from .distributed import data_parallel_world, rank_normaliser
from .scoring import IGNORE_INDEX
from .transform import CGGRModel, slice_rows

__all__ = ["enable_cggr", "route_step", "METRIC_LOG_KEYS"]

# enable_cggr's selection when none is given (the library's default, importance, needs its own loss)
TRAINER_DEFAULT_SELECTION = "stratified"
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
    """One micro-batch's selection: what the router chose and the metrics of that choice."""

    __slots__ = ("shape", "selection", "weight", "metrics")

    def __init__(self, shape: torch.Size, selection: Tensor, weight: Tensor, metrics: dict) -> None:
        self.shape, self.selection, self.weight, self.metrics = shape, selection, weight, metrics


def _select(cg: CGGRModel, inputs: dict, record: bool) -> _Selected:
    ids = inputs["input_ids"]
    rest = {k: v for k, v in inputs.items()
            if k not in _NOT_FOR_ROUTER and k not in ("input_ids", "attention_mask")}
    selection, weight, metrics = cg.select(ids, inputs.get("attention_mask"), inputs["labels"], record=record, **rest)
    return _Selected(ids.shape, selection, weight, metrics)


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
    """
    _check_selection(cg)
    batches = [dict(b) for b in micro_batches]
    sels, total = _select_step(cg, batches)
    total = _rank_normalised(cg, total)
    return [{**_cut(cg, b, s), num_items_key: total} for b, s in zip(batches, sels)]


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

    PATCHED = ("get_batch_samples", "compute_loss", "log")

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

    def add(self, m: dict) -> None:
        """One micro-batch's metrics."""
        self.micro += 1
        self.k_sum += float(m.get("k", 0))
        self.ratio_sum += float(m.get("token_ratio", 0.0))
        for key in _MEAN_KEYS + _PER_STEP_KEYS:
            v = m.get(key)
            if isinstance(v, Tensor):
                v = v.detach().to(torch.float32)
                self.sums[key] = v if key not in self.sums else self.sums[key] + v

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
        for key in _MEAN_KEYS:
            if key in values:
                out[f"cggr/{key}"] = values[key] / self.micro
        self.reset()
        return out


def _callback(integration: "_TrainerIntegration") -> Any:
    """A ``TrainerCallback`` that advances the schedule once per optimizer step (``on_step_end``)."""
    from transformers import TrainerCallback

    class CGGRTrainerCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            integration.cggr.step()
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
            return orig(model, cut, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs)
        return self._own_loss(model, cut, return_outputs, num_items_in_batch, passed)

    def _own_loss(self, model: nn.Module, cut: dict, return_outputs: bool, denominator: Any, passed: Any) -> Any:
        """CGGR's loss from the model's logits, scaled like the Trainer expects it."""
        t = self.internals
        labels = cut.pop("labels")
        cut.pop("shift_labels", None)
        outputs = model(**cut)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
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
    if config is None and "selection" not in options and options.get("granularity", "sequences") == "sequences":
        # The library's default, importance sampling, weighs each drawn row's loss, which the model's
        # own loss cannot carry: the Trainer path keeps easy rows in every batch by strata instead.
        options["selection"] = TRAINER_DEFAULT_SELECTION
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

