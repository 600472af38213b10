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

# Inputs the router never sees (the loss's, or options of the call).
# enable_cggr's selection when none is given (the library's default, importance, needs its own loss)
TRAINER_DEFAULT_SELECTION = "stratified"
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
    sels = [_select(cg, b, record=False) for b in batches]
    for s in sels:
        cg._record(s.metrics)
    total = sum(s.metrics["tokens_selected"] for s in sels)
    if cg.cggr_config.data_parallel_normalize and data_parallel_world() > 1:
        total = rank_normaliser(total)  # DDP/FSDP average over ranks: every selected token weighs the same
    return [{**_cut(cg, b, s), num_items_key: total} for b, s in zip(batches, sels)]


# --------------------------------------------------------------------------------------------
# transformers.Trainer (and TRL's SFTTrainer)
# --------------------------------------------------------------------------------------------
def _callback(integration: "_TrainerIntegration") -> Any:
    """A ``TrainerCallback`` that advances the schedule once per optimizer step (``on_step_end``)."""
    from transformers import TrainerCallback

    class CGGRTrainerCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            integration.cggr.step()
            return control

    return CGGRTrainerCallback()


class _TrainerIntegration:
    """The state ``enable_cggr`` attaches to a trainer (``trainer._cggr``)."""

    def __init__(self, trainer: Any, cg: CGGRModel) -> None:
        self.trainer = trainer
        self.cggr = cg
        self.pending: deque[Optional[_Selected]] = deque()
        self.on_the_fly = 0  # micro-batches routed inside compute_loss (no pending selection)
        self._warned: set[str] = set()
        self._reset_window()
        self.orig = {name: getattr(trainer, name) for name in ("get_batch_samples", "compute_loss", "log")}

    # -- metrics window -----------------------------------------------------------------------
    def _reset_window(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.micro = 0
        self.steps = 0
        self.k_sum = 0.0
        self.ratio_sum = 0.0

    def _accumulate(self, m: dict) -> None:
        self.micro += 1
        self.k_sum += float(m.get("k", 0))
        self.ratio_sum += float(m.get("token_ratio", 0.0))
        for key in _MEAN_KEYS + _PER_STEP_KEYS:
            v = m.get(key)
            if isinstance(v, Tensor):
                v = v.detach().to(torch.float32)
                self.sums[key] = v if key not in self.sums else self.sums[key] + v

    def log_entries(self) -> dict[str, float]:
        """The window's means (this is the one place that reads the device tensors)."""
        if self.micro == 0:
            return {}
        values = {k: float(v) for k, v in self.sums.items()}
        steps = max(self.steps, 1)
        out = {
            "cggr/step": float(self.cggr.schedule.step),
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
        self._reset_window()
        return out

    # -- helpers ------------------------------------------------------------------------------
    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _router_context(self) -> Any:
        """The trainer's autocast (accelerate's mixed precision), so the router runs like the model."""
        acc = getattr(self.trainer, "accelerator", None)
        if acc is not None and hasattr(acc, "autocast"):
            return acc.autocast()
        return contextlib.nullcontext()

    def _to_device(self, inputs: dict) -> dict:
        device = self.trainer.args.device
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    def _sync_schedule(self) -> None:
        """The schedule counts optimizer steps: follow the trainer's (a resume, a second train())."""
        step = int(getattr(self.trainer.state, "global_step", 0) or 0)
        cg = self.cggr
        if cg.schedule.step != step:
            cg.schedule.set_step(step)

    def _check_rows(self, shape: torch.Size) -> None:
        if self.cggr.cggr_config.granularity == "sequences" and shape[0] == 1:
            self.warn_once("one-row", (
                "cggr: the training batches have one row (padding-free or packed into one sequence), so "
                "selecting sequences keeps all of it and saves nothing; use granularity='tokens' (selective "
                "loss) or batches of several rows (e.g. TRL's packing_strategy='wrapped')."
            ))

    def _denominator(self, total: Tensor) -> Tensor:
        """Across data-parallel ranks (not tested here: one process).

        With ``average_tokens_across_devices`` (the default) like the Trainer's own count: the sum
        over ranks (the Trainer then multiplies the loss by the number of processes). Without it,
        CGGR's own rule (``cggr_compile.distributed``): the sum over ranks divided by the world.
        """
        args = self.trainer.args
        if getattr(args, "world_size", 1) > 1:
            if getattr(args, "average_tokens_across_devices", False):
                return self.trainer.accelerator.gather(total.reshape(1)).sum()
            if self.cggr.cggr_config.data_parallel_normalize and data_parallel_world() > 1:
                return rank_normaliser(total)
        return total

    # -- patched trainer methods --------------------------------------------------------------
    def get_batch_samples(self, *args: Any, **kwargs: Any) -> tuple[list, Any]:
        batch_samples, num_items = self.orig["get_batch_samples"](*args, **kwargs)
        self.pending.clear()
        if not batch_samples or not all(_routable(b) for b in batch_samples):
            self.pending.extend([None] * len(batch_samples))
            return batch_samples, num_items
        self._sync_schedule()
        with torch.no_grad(), self._router_context():
            sels = [_select(self.cggr, self._to_device(b), record=False) for b in batch_samples]
        for s in sels:
            self._check_rows(s.shape)
            self.cggr._record(s.metrics)
            self._accumulate(s.metrics)
        self.steps += 1
        self.pending.extend(sels)
        total = sum(s.metrics["tokens_selected"] for s in sels)
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
            with torch.no_grad(), self._router_context():
                sel = _select(self.cggr, inputs, record=True)
            self._accumulate(sel.metrics)
            self._check_rows(sel.shape)
            if num_items_in_batch is not None:
                steps = int(getattr(self.trainer, "current_gradient_accumulation_steps", 1) or 1)
                num_items_in_batch = sel.metrics["tokens_selected"] * steps
        cut = _cut(self.cggr, inputs, sel)
        if self._delegate():
            return orig(model, cut, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs)
        return self._own_loss(model, cut, return_outputs, num_items_in_batch, passed)

    def _delegate(self) -> bool:
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
        if t.compute_loss_func is not None or getattr(t, "label_smoother", None) is not None:
            return True
        return bool(t.model_accepts_loss_kwargs and getattr(t, "_loss_shifts_labels", False))

    def _own_loss(self, model: nn.Module, cut: dict, return_outputs: bool, denominator: Any, passed: Any) -> Any:
        """CGGR's loss from the model's logits, scaled like the Trainer expects it."""
        t = self.trainer
        labels = cut.pop("labels")
        cut.pop("shift_labels", None)
        outputs = model(**cut)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        target = S.aligned_labels(labels, self.cggr.causal)
        loss = S.selective_cross_entropy(logits, target, target != IGNORE_INDEX, denominator)
        scaled = getattr(t, "loss_is_scaled_for_ga", None)
        if scaled is None:  # transformers' rule in training_step
            scaled = (t.model_accepts_loss_kwargs and passed is not None) or t.compute_loss_func is not None
        if denominator is not None and not scaled:  # it will divide by the accumulation steps: undo that
            loss = loss * int(getattr(t, "current_gradient_accumulation_steps", 1) or 1)
        if getattr(t.args, "average_tokens_across_devices", False) and getattr(t.args, "world_size", 1) > 1 \
                and passed is not None:  # the count is the ranks' sum and DDP averages: as Trainer.compute_loss
            tp = t.get_tp_size() if hasattr(t, "get_tp_size") else 1
            loss = loss * (t.accelerator.num_processes // tp)
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
    for name in ("get_batch_samples", "compute_loss", "log", "add_callback", "model", "args"):
        if not hasattr(trainer, name):
            raise TypeError(f"cggr: enable_cggr expects a transformers.Trainer (it has no {name!r}).")
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
    integration = _TrainerIntegration(trainer, cg)
    trainer.get_batch_samples = integration.get_batch_samples
    trainer.compute_loss = integration.compute_loss
    trainer.log = integration.log
    trainer.add_callback(_callback(integration))
    if cg.cggr_config.scoring == "reducible":
        _keep_column(trainer, "reference_loss")
    trainer._cggr = integration
    return cg


def _keep_column(trainer: Any, column: str) -> None:
    """Keep ``column`` in the batches: the Trainer drops dataset columns its model's forward does not
    name (``remove_unused_columns``), and the router reads this one."""
    fill = getattr(trainer, "_set_signature_columns_if_needed", None)
    if fill is None:
        return

    def set_signature_columns_if_needed() -> None:
        fill()
        if trainer._signature_columns is not None and column not in trainer._signature_columns:
            trainer._signature_columns.append(column)

    trainer._set_signature_columns_if_needed = set_signature_columns_if_needed
