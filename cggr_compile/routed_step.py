"""A routed training step after the routing: the main pass on the selection, the selective loss,
the learned exit's fit and the step's metrics; and the model's calling convention they need.

:func:`routed_step` is the step the backend traces (``passes/trace_routed_step.py`` calls it through
``CGGRModel.routed_step``): :func:`~cggr_compile.routing.route_and_choose`, then the rows (or the
token mask) that train through :func:`main_pass`, ``passes/fuse_loss.py:selective_loss``, and with
``scoring='predicted'`` the exit's fit (:func:`exit_fit_inputs`); then the step's metrics
(:func:`routed_metrics`). :func:`routed_selection` is the same step without its main pass
(``CGGRModel.select``).

How a model is called (``config.ModelCall``): :func:`bind` reads a call's arguments by the model's
names, :func:`call_plain` calls the model by them (:func:`unrouted_call`: a call that does not
train), :func:`user_output` gives a step's output back in the model's own form (nanoGPT's
``(logits, loss)``).

The functions take the core (``CGGRModel``, seen through :class:`StepCore`) explicitly: this module
never imports ``transform.py``, which imports it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from torch import Tensor, nn
from transformers.utils import ModelOutput

from .config import CGGRConfig, ModelCall
from .exit import FitInputs
from .metrics import selected_difficulty, skip_metrics, step_metrics, token_counts
from .passes.fuse_loss import fused_main_pass, selective_loss
from .router import unwrap_peft
from .routing import RoutingCore, route_and_choose
from .schedule import RoutedPlan, Schedule
from .selection import Choice, Routing, loss_count, loss_denominator


@dataclass
class CGGROutput(ModelOutput):
    """Output of a CGGR step for models whose forward returns a bare logits tensor."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None


class StepCore(RoutingCore, Protocol):
    """What a routed step reads of the core besides routing's (``CGGRModel``'s attributes; the plain
    ones, ``model_call``, ``fused_loss``, ``_hf_call`` and ``_positional``, from its ``__dict__``)."""

    schedule: Schedule


def call_model(model: nn.Module, input_ids: Any, attention_mask: Any = None, labels: Any = None, **kwargs: Any) -> Any:
    """Call ``model`` passing only the arguments that are set (plain modules take no labels=)."""
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if labels is not None:
        kwargs["labels"] = labels
    out = model(input_ids=input_ids, **kwargs)
    return CGGROutput(logits=out) if isinstance(out, Tensor) else out


def _is_per_row(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch


def per_row_inputs(kwargs: dict, batch: int) -> dict:
    """The keyword inputs with one entry per row (``position_ids``, ``token_type_ids``...)."""
    return {n: v for n, v in kwargs.items() if _is_per_row(v, batch)}


def slice_rows(value: Any, idx: Tensor, batch: int) -> Any:
    """``value[idx]`` for per-row tensors (leading dim == batch); anything else unchanged."""
    return value.index_select(0, idx) if _is_per_row(value, batch) else value


def positional_names(model: nn.Module, call: ModelCall) -> tuple[str, ...]:
    """The names of a call's positional inputs, in order, read once at construction (inspect is not
    traced by Dynamo): Hugging Face's ``(input_ids, attention_mask, labels)``, else the model's forward's
    (through PEFT, which passes them on)."""
    if call.is_hugging_face:
        return ("input_ids", "attention_mask", "labels")
    params = inspect.signature(unwrap_peft(model).forward).parameters
    return tuple(n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def bind(core: StepCore, args: tuple, kwargs: dict) -> tuple[Any, Any, Any, dict]:
    """``(input_ids, attention_mask, labels, other kwargs)`` of a call, by the model's names.

    Hugging Face models keep the positional order ``(input_ids, attention_mask, labels)``;
    others bind positional arguments through their forward's signature (``gpt(idx, targets)``).
    A model whose forward takes no labels or mask gets CGGR's own ``labels=`` /
    ``attention_mask=``."""
    call: ModelCall = core.__dict__["model_call"]
    kwargs = dict(kwargs)
    names = core.__dict__["_positional"]
    if len(args) > len(names):
        raise TypeError(
            f"cggr: {type(core.model).__name__} takes {len(names)} positional inputs ({', '.join(names)}), "
            f"got {len(args)}; pass the others by name."
        )
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"cggr: {name} was given both positionally and by name.")
        kwargs[name] = value
    kwargs = call.canonical(kwargs)
    return kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None), kwargs.pop("labels", None), kwargs


def call_plain(core: StepCore, input_ids: Any, attention_mask: Any, labels: Any, kwargs: dict) -> Any:
    """The model called as its user calls it, by its own names; its output unchanged."""
    call: ModelCall = core.__dict__["model_call"]
    kwargs = dict(kwargs)
    if call.attention_mask is not None and attention_mask is not None:
        kwargs[call.attention_mask] = attention_mask
    if call.labels is not None and labels is not None:
        kwargs[call.labels] = labels
    return core.model(**{call.inputs: input_ids}, **kwargs)


def unrouted_call(core: StepCore, input_ids: Any, attention_mask: Any, labels: Any, kwargs: dict) -> Any:
    """A call that does not train (eval, no_grad or no labels): exactly the plain model, which knows
    no ``reference_loss``, and its output in its own form."""
    kwargs.pop("reference_loss", None)
    if not core.__dict__["_hf_call"]:
        return call_plain(core, input_ids, attention_mask, labels, kwargs)
    out = call_model(core.model, input_ids, attention_mask, labels, **kwargs)
    return out.logits if isinstance(out, CGGROutput) else out


def user_output(call: ModelCall, out: Any) -> Any:
    """A training step's output in the model's own form: a tuple where the model returns one
    (nanoGPT's ``(logits, loss)``: the selected rows' logits and CGGR's loss)."""
    if call.logits_index is None:
        return out
    loss_index = call.loss_index if call.loss_index is not None else call.logits_index + 1
    items: list[Any] = [None] * (max(call.logits_index, loss_index) + 1)
    items[call.logits_index] = out.logits
    items[loss_index] = out.loss
    return tuple(items)


def main_pass(core: StepCore, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
              **kwargs: Any) -> Any:
    """The model on the rows (or batch) that train: an output with ``.logits`` and item access.

    ``labels`` are the model's own (its ignore index); they reach the model only where
    ``ModelCall.labels_to_model`` says so (nanoGPT), never a Hugging Face model (its loss would
    be computed for nothing)."""
    call: ModelCall = core.__dict__["model_call"]
    if core.__dict__["fused_loss"]:  # no logits: the loss is formed from the hidden states
        return fused_main_pass(core.__dict__["fused_loss"], input_ids, attention_mask, kwargs, CGGROutput)
    if core.__dict__["_hf_call"]:
        return call_model(core.model, input_ids, attention_mask, **kwargs)
    labels = labels if call.labels_to_model else None
    if call.logits_module is not None:
        out = core.model.get_submodule(call.logits_module)(input_ids)
    else:
        out = call_plain(core, input_ids, attention_mask, labels, kwargs)
    if isinstance(out, (tuple, list)):
        if call.logits_index is None:
            raise TypeError(
                f"cggr: {type(core.model).__name__} returned a {type(out).__name__}; say where its "
                "logits are: model_call=cggr_compile.ModelCall(..., logits_index=0, loss_index=1)."
            )
        return CGGROutput(logits=out[call.logits_index])
    return CGGROutput(logits=out) if isinstance(out, Tensor) else out


def exit_fit_inputs(r: Routing, choice: Choice, config: CGGRConfig) -> FitInputs:
    """What the learned exit (``exit.py``) fits on after the main pass: the trained positions' hidden
    states and predictions, and each one's fit weight.

    Sequences: the selected rows, each position weighted by the inverse of its row's chance of being
    drawn (``selection='truncation'``: :func:`~cggr_compile.scoring.truncated_draw`, its probes of
    skipped rows included, which train nothing; ``importance``: its loss weight ``1 / (k p)``), which
    makes the fit the whole batch's regression; 1 otherwise.
    Tokens: the main pass computed every position's loss, so every valid position fits, with weight 1
    (no selection bias at all)."""
    if config.granularity == "sequences":
        idx = choice.selection
        weight = choice.weight.float() if choice.fit_weight is None else choice.fit_weight
        return FitInputs(r.hidden.index_select(0, idx), r.difficulty.index_select(0, idx), weight)
    return FitInputs(r.hidden, r.difficulty, r.valid.float())


def routed_metrics(core: StepCore, r: Routing, choice: Choice, plan: RoutedPlan,
                   exit_metrics: Optional[dict[str, Tensor]] = None) -> dict[str, Any]:
    """A routed step's metrics (``metrics.step_metrics``) from its routing and choice: the same keys
    for a training step and a ``select``."""
    cfg = core.cggr_config
    return step_metrics(
        cfg, core.schedule, r.metrics, plan.ratio, plan.k, choice.selection,
        selected_difficulty=selected_difficulty(r.difficulty, choice.weight, choice.selection, cfg.granularity),
        **token_counts(choice.weight, r.valid), **skip_metrics(choice.skipped, r.valid, cfg.granularity),
        **(exit_metrics or {}),
    )


def routed_step(
    core: StepCore, plan: RoutedPlan, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor,
    kwargs: dict,
) -> tuple[Any, dict[str, Any], Optional[Tensor]]:
    """One routed training step as ``plan`` says: router, selection, main pass on the
    selection, selective loss, and (``scoring='predicted'``) the learned exit's fit. Returns the
    output (with ``loss``, the selection and ``cggr_metrics``), the metrics and the exit's new
    state (None without an exit; ``CGGRModel.record_step`` keeps it). A function of ``plan`` and the
    batch only (the backend traces it, with the plan's step counter and exit state graph inputs)."""
    cfg = core.cggr_config
    b = input_ids.shape[0]
    kwargs = dict(kwargs)
    denominator = kwargs.pop("loss_denominator", None)
    reference_loss = kwargs.pop("reference_loss", None)
    r, choice = route_and_choose(core, plan, input_ids, attention_mask, labels, reference_loss,
                                 per_row_inputs(kwargs, b))
    idx, weight = choice.selection, choice.weight
    fits = core.exit is not None
    if cfg.granularity == "sequences":
        sliced = {n: slice_rows(v, idx, b) for n, v in kwargs.items()}
        mask_k = attention_mask.index_select(0, idx) if attention_mask is not None else None
        labels_k = labels.index_select(0, idx) if core.model_call.labels_to_model else None
        out = main_pass(core, input_ids.index_select(0, idx), mask_k, labels_k, **sliced)
        denominator = loss_denominator(weight, denominator, cfg, loss_count(r, cfg))
        loss = selective_loss(core.__dict__["fused_loss"], out, r.target.index_select(0, idx), weight,
                              denominator, return_token_loss=fits)
        out["selected_indices"] = idx
    else:  # the token mask is both the selection and the weight
        out = main_pass(core, input_ids, attention_mask, labels, **kwargs)
        denominator = loss_denominator(weight, denominator, cfg)
        loss = selective_loss(core.__dict__["fused_loss"], out, r.target, weight, denominator,
                              return_token_loss=fits)
        out["selected_mask"] = weight
    exit_state, exit_metrics = None, {}
    if fits:
        loss, token_loss = loss
        exit_state, exit_metrics = core.exit.fit(plan.exit_state, exit_fit_inputs(r, choice, cfg), token_loss)
    out["loss"] = loss
    metrics = routed_metrics(core, r, choice, plan, exit_metrics)
    out["cggr_metrics"] = metrics
    return out, metrics, exit_state


def routed_selection(core: StepCore, plan: RoutedPlan, input_ids: Tensor, attention_mask: Optional[Tensor],
               labels: Optional[Tensor], kwargs: dict) -> tuple[Routing, Choice, dict[str, Any]]:
    """A routed step without its main pass (``CGGRModel.select``): the routing, the choice and the
    step's metrics, with the exit's readiness where a training step reports its fit."""
    b = input_ids.shape[0]
    reference_loss = kwargs.pop("reference_loss", None)
    r, choice = route_and_choose(core, plan, input_ids, attention_mask, labels, reference_loss,
                                 per_row_inputs(kwargs, b))
    # Whether this selection ranked by the exit (a forward's fit reports the same from its state).
    exit_ready = {"exit_ready": r.ready.float()} if r.ready is not None else None
    return r, choice, routed_metrics(core, r, choice, plan, exit_ready)
