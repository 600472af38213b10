"""The module-level rewrite: router (no grad) -> score -> select -> main pass on the selection.

:class:`CGGRModel` is the façade (construction, ``forward``, ``select``, the schedule's hooks, the
metrics and CGGR's state); each stage of a batch is a named function of the module that owns it.
One batch, start to end (:meth:`CGGRModel.forward`):

1. ``plan_step`` (host, never traced): the schedule turns the step counter and the lagged mean
   confidence into an immutable :class:`~cggr_compile.schedule.RoutedPlan` (the ratio level,
   ``k`` rows, the device step counter...); the step reads only the plan, so a compiled forward
   specialises on its values and a whole schedule compiles at most ``num_levels`` times.
2. :func:`cggr_compile.routed_step.routed_step`, the step proper (the backend traces it):
   :func:`cggr_compile.routing.route` runs the truncated router and scores every position
   (``scoring.py``), ``selection.choose`` selects rows or tokens with static shapes;
   :func:`cggr_compile.routed_step.main_pass` runs the wrapped model on ``input_ids[idx]`` (and the
   mask and every per-row input sliced the same way), or on the whole batch with a token mask; the
   loss is the selective cross-entropy, and ``scoring='predicted'`` fits the learned exit
   (``exit.py``).
3. ``record_step`` (host, never traced): the mean confidence starts its non-blocking trip to the host
   for the dynamic threshold of a later step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .config import CGGRConfig
from .errors import fall_back
from .exit import FitInputs, learned_exit
from .passes.fuse_loss import choose_fused_loss
from .router import WholeModelRouter, build_router, model_call_for, refresh_router
from .routed_step import bind, exit_fit_inputs, positional_names, routed_selection, unrouted_call, user_output
from .routed_step import routed_step as _routed_step
from .routing import cggr_labels, route, sequence_difficulty
from .schedule import RoutedPlan, Schedule
from .selection import Routing

# Moved to the modules that own them, still importable from here (benchmarks, compat, integrations
# and the backend import them from cggr_compile.transform).
from .routed_step import CGGROutput, slice_rows  # noqa: F401
from .routing import check_reference_loss_is_read, score_positions  # noqa: F401


def check_batch(input_ids: Any, labels: Any = None, attention_mask: Any = None) -> None:
    """SPEC.md's bad inputs: clear errors instead of a stack trace from deep inside the model."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.is_complex() or input_ids.dtype == torch.bool:
        what = (
            f"a {input_ids.dim()}-d {input_ids.dtype} tensor" if isinstance(input_ids, Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(
            f"cggr: input_ids must be a (batch, seq) integer tensor, got {what}; tokenize and "
            "batch first (for one sequence use input_ids.unsqueeze(0))."
        )
    if labels is not None:
        if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                f"cggr: labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{shape}; pass unshifted labels (CGGR shifts them like the model's loss)."
            )
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape)
    ):
        raise ValueError(
            f"cggr: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}."
        )


def _router_modules(router: Any) -> list[nn.Module]:
    """The modules a router holds (its shallow clones of the model's layers, norm and head)."""
    if router is None:
        return []
    return [m for m in vars(router).values() if isinstance(m, nn.Module)]


class WrappedModel(nn.Module):
    """A module that stands for the model it wraps (``self.model``) in checkpoints and attributes.

    ``state_dict()`` / ``load_state_dict()`` are the wrapped model's (same keys), so checkpoints
    move freely between the two; an attribute the wrapper lacks is the wrapped model's
    (``cg.config``, ``cg.generate``...)."""

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.model.load_state_dict(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


@contextlib.contextmanager
def swapped_slots(roots: list[nn.Module], replacements: dict[int, Tensor]) -> Iterator[None]:
    """While inside, every parameter / buffer slot of the modules under ``roots`` that holds a tensor
    in ``replacements`` (keyed by ``id``) holds its replacement; the slots are restored on exit."""
    undo = []
    seen = set()
    for root in roots:
        for mod in root.modules():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is not None and id(t) in replacements:
                        undo.append((store, name, t))
                        store[name] = replacements[id(t)]
    try:
        yield
    finally:
        for store, name, t in reversed(undo):
            store[name] = t


class CGGRModel(WrappedModel):
    """A model that trains with CGGR and otherwise behaves exactly like the model it wraps.

    ``parameters()`` yields the wrapped model's own tensors and ``state_dict()`` /
    ``load_state_dict()`` are the wrapped model's (same keys), so checkpoints move freely between
    the two. In training with labels and grad enabled, ``forward`` returns the model's usual output
    whose ``loss`` is the CGGR loss, plus ``selected_indices`` (rows, sequences granularity) or
    ``selected_mask`` (tokens) and ``cggr_metrics``. Call :meth:`step` once per optimizer step (or
    :meth:`attach_optimizer` once). ``loss_denominator=`` (a number or device tensor) replaces the
    count of selected tokens in the loss's mean, for gradient accumulation and data parallelism.

    Each stage of a step is a function, taking this core, of the module that owns it: routing
    (``routing.py``), the main pass and the loss (``routed_step.py``), the learned exit (``exit.py``).
    """

    def __init__(self, model: nn.Module, config: Optional[CGGRConfig] = None, **options: Any) -> None:
        super().__init__()
        if config is None:
            config = CGGRConfig.from_options(options)
        elif options:
            config = config.replace(**options)
        self.model = model
        router, causal = build_router(model, config.router_layers, config.router, config.strict,
                                      spec=config.router_spec)
        config = _scoring_for_router(config, router, model)
        self.cggr_config = config
        # How the model is called (its names for the tokens, labels and mask; its output), once.
        call = model_call_for(model, config.model_call, config.router_spec)
        self.__dict__["model_call"] = call
        self.__dict__["_hf_call"] = call.is_hugging_face
        self.__dict__["_positional"] = positional_names(model, call)  # a call's positional order
        # Plain attributes (not submodules): no second registration of the shared tensors.
        self.__dict__["router"] = router
        self.__dict__["reference_router"] = _reference_router(config)
        self.__dict__["schedule"] = Schedule(config)
        # Advance once per optimizer step that updates the model, without the user's help.
        self.schedule.watch(model)
        # Whether CGGR shifts the labels by one position (a causal LM's labels not pre-shifted).
        self.causal = causal and not call.labels_shifted
        # The backend's routed graphs of this core (cggr_compile.backend.RoutedGraph), for tests and
        # introspection; the eager transform has none.
        self.__dict__["routed_graphs"] = []
        # The main pass's loss: the model's logits, or the fused head + loss (passes/fuse_loss.py).
        self.__dict__["fused_loss"] = choose_fused_loss(model, config.fused_loss, config.strict)
        # scoring='predicted': the learned exit (its state is no parameter: a plain attribute).
        self.__dict__["exit"] = learned_exit(model, router, config)

    # -- schedule -------------------------------------------------------------------------------
    def step(self) -> None:
        """Count an optimizer step. Not needed: the schedule advances by itself after each
        optimizer step that updates this model (see :class:`~cggr_compile.schedule.Schedule`); a call
        after that optimizer step counts the same step, not a second one."""
        self.schedule.user_step()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """Advance the schedule after every ``optimizer.step()``; returns the hook handle. Not
        needed any more (the schedule finds the optimizer by itself); it counts no step twice."""
        return optimizer.register_step_post_hook(lambda *_: self.step())

    def metrics(self) -> dict[str, Any]:
        """The last training step's metrics (device tensors; reading them synchronises)."""
        return dict(self.__dict__.get("_last_metrics", {}))

    @torch.compiler.disable
    def plan_step(self, batch: int, device: torch.device) -> RoutedPlan:
        """Plan the next routed step (host, never traced): the schedule's :class:`RoutedPlan` for a
        batch of ``batch`` rows on ``device``. Also logs the schedule once, marks the step as
        planned for the schedule's automatic advance and refreshes the routers' clones."""
        self.schedule.log_once(batch)
        self.schedule.planned()
        self._refresh_routers()
        plan = self.schedule.plan(batch, device)
        if self.exit is not None:
            plan = plan.replace(exit_state=self.exit.state_on(device))
        self.__dict__["_planned"] = plan
        return plan

    def swapped_tensors(self, replacements: dict[int, Tensor]) -> contextlib.AbstractContextManager[None]:
        """While inside, every parameter / buffer slot of the wrapped model and of the routers'
        clones that holds a tensor in ``replacements`` (keyed by ``id``) holds its replacement.

        The backend's trace runs the routed step on its graph inputs this way, so no weight is
        baked into the graph as a constant; the slots are restored on exit."""
        roots = [self.model] + _router_modules(self.router) + _router_modules(self.__dict__["reference_router"])
        return swapped_slots(roots, replacements)

    @torch.compiler.disable
    def _refresh_routers(self) -> None:
        """The router's clones follow the model's live state (adapters toggled or merged, flags)."""
        refresh_router(self.router)
        refresh_router(self.__dict__["reference_router"])

    @torch.compiler.disable
    def record_step(self, metrics: dict[str, Any], exit_state: Optional[Tensor] = None) -> None:
        """Keep a finished step's metrics (:meth:`metrics`) and the learned exit's new state (a device
        copy), and start the non-blocking trip of its mean confidence to the host, for the dynamic
        threshold of a later step."""
        self.__dict__["_last_metrics"] = metrics
        if exit_state is not None:
            self.exit.commit(exit_state)
        if "avg_confidence" in metrics:
            self.schedule.confidence.push(metrics["avg_confidence"])

    # -- the step: routing.py, routed_step.py ------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(...)`` with CGGR in training: the model's own arguments (``ModelCall`` names
        them: ``input_ids=`` / ``labels=``, or nanoGPT's ``(idx, targets)``...)."""
        input_ids, attention_mask, labels, kwargs = bind(self, args, kwargs)
        if not (self.model.training and torch.is_grad_enabled() and labels is not None):
            return unrouted_call(self, input_ids, attention_mask, labels, kwargs)  # eval, no_grad or no labels
        check_batch(input_ids, labels, attention_mask)
        # Hugging Face's count covers every labelled token; CGGR's loss normalises by the selected
        # ones (pass loss_denominator= for a count across micro-batches or ranks).
        kwargs.pop("num_items_in_batch", None)
        # Read the plan back as the module's attribute, not as plan_step's return value: Dynamo breaks
        # the graph at plan_step, and a returned plan would enter the resumed frame as an input whose
        # ints (k, a shape) automatic dynamic shapes make symbolic after their first change (one
        # dynamic graph for every later level); a module attribute's are specialised, one static
        # graph per level as the schedule promises.
        self.plan_step(input_ids.shape[0], input_ids.device)
        plan = self._planned
        out, metrics, exit_state = self.routed_step(plan, input_ids, attention_mask, labels, kwargs)
        self.record_step(metrics, exit_state)
        return user_output(self.__dict__["model_call"], out)

    def routed_step(
        self, plan: RoutedPlan, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor, kwargs: dict
    ) -> tuple[Any, dict[str, Any], Optional[Tensor]]:
        """One routed training step as ``plan`` says (:func:`cggr_compile.routed_step.routed_step`;
        the backend traces this method): ``(output, metrics, the exit's new state or None)``."""
        return _routed_step(self, plan, input_ids, attention_mask, labels, kwargs)

    def route(self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
              reference_loss: Optional[Tensor] = None, *, plan: Optional[RoutedPlan] = None, **rows: Any) -> Routing:
        """Run the router and score every position, no grad (:func:`cggr_compile.routing.route`)."""
        return route(self, input_ids, attention_mask, labels, reference_loss, plan=plan, **rows)

    def _cggr_labels(self, labels: Optional[Tensor]) -> Optional[Tensor]:
        """The labels with the model's ignore index as CGGR's (-100)."""
        return cggr_labels(self.__dict__["model_call"], labels)

    def sequence_difficulty(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
        **rows: Any,
    ) -> Tensor:
        """The router's per-sequence difficulty ``[B]`` (mean over valid positions)."""
        check_batch(input_ids, labels, attention_mask)
        self._refresh_routers()
        return sequence_difficulty(self, input_ids, attention_mask, labels, **rows)

    def select(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
        record: bool = True, return_fit_inputs: bool = False, **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Router and selection only (no grad, no main pass): what a training ``forward`` would
        select now, with the schedule's current level.

        Returns ``(selection, weight, metrics)``: the row indices ``[k]`` (sequences) or the token
        mask ``[B, T]`` (tokens); the boolean ``weight`` of the positions that enter the loss,
        aligned like the router's targets (``[k, T]`` for the selected rows, or ``[B, T]``); and
        the metrics, whose ``tokens_selected`` (``weight.sum()``, a device tensor) is the count the
        loss normalises by. Summed over the micro-batches of one optimizer step it is their shared
        ``loss_denominator`` (``cggr_compile.integrations`` does this for the Trainer). With
        ``selection='importance'`` the weight is float, ``1 / (k p)`` on the drawn rows' valid
        positions, and the loss normalises by ``tokens_total`` (the batch's valid positions): sum
        that instead.
        ``record=False`` leaves the schedule's lagged confidence alone (push it later with
        :meth:`record_step`), so every micro-batch of a step is planned from the same state.
        ``return_fit_inputs=True`` appends what the learned exit fits on once the selection has
        trained (``scoring='predicted'``; None otherwise): pass it, with the main pass's per-token
        loss, to :meth:`fit_exit`.
        """
        check_batch(input_ids, labels, attention_mask)
        self.plan_step(input_ids.shape[0], input_ids.device)
        plan = self._planned  # see forward: static k under compile
        r, choice, metrics = routed_selection(self, plan, input_ids, attention_mask, labels, kwargs)
        if record:
            self.record_step(metrics)
        if not return_fit_inputs:
            return choice.selection, choice.weight, metrics
        fit = exit_fit_inputs(r, choice, self.cggr_config) if self.exit is not None else None
        return choice.selection, choice.weight, metrics, fit

    # -- the learned exit and CGGR's state -----------------------------------------------------
    def fit_exit(self, fit: FitInputs, token_loss: Tensor) -> dict[str, Tensor]:
        """Fit the learned exit on a trained selection (:meth:`select`'s ``fit`` and the main pass's
        per-token loss at the same positions, ``[rows, T]``; detached here), for loops that run the
        main pass themselves (the Trainer integration, :func:`~cggr_compile.integrations.route_step`).
        Returns the exit's metrics (device tensors); no host sync."""
        if self.exit is None:
            raise ValueError(f"cggr: fit_exit needs scoring='predicted' (scoring={self.cggr_config.scoring!r}).")
        state = self.exit.state_on(token_loss.device)
        new_state, metrics = self.exit.fit(state, fit, token_loss)
        self.exit.commit(new_state)
        return metrics

    def cggr_state_dict(self) -> dict[str, Any]:
        """CGGR's own state, apart from the model's (``state_dict()`` stays the model's): the
        schedule's step and the learned exit's statistics. Save it beside a checkpoint and give it to
        :meth:`load_cggr_state_dict` on resume; without it the exit starts cold (uniform selection)
        and ranks again after ``exit_min_fits`` fits."""
        state: dict[str, Any] = {"step": self.schedule.step}
        if self.exit is not None:
            state["exit"] = self.exit.state_dict()
        return state

    def load_cggr_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`cggr_state_dict`'s state (the schedule's step and the learned exit's)."""
        if "step" in state:
            self.schedule.set_step(int(state["step"]))
        if self.exit is not None and state.get("exit") is not None:
            self.exit.load_state_dict(state["exit"])


def _scoring_for_router(config: CGGRConfig, router: Any, model: nn.Module) -> CGGRConfig:
    """The learned exit (the default scoring) needs the router's hidden states. A router CGGR had to
    build from the whole model (a layout it does not know; already a warned fallback) gives none:
    then score by the router's loss instead, with a warning (an error under ``strict``). A user's
    ``router=`` with ``scoring='predicted'`` is an error (``exit.learned_exit``)."""
    if config.scoring != "predicted" or config.router is not None or callable(getattr(router, "hidden", None)):
        return config
    fall_back(
        f"cggr: scoring='predicted' (the default) reads the router's hidden states, and the whole-model router "
        f"CGGR built for {type(model).__name__} gives none: scoring by the router's loss instead (scoring='loss'); "
        "pass router_spec= so that CGGR can truncate the model, or choose a scoring", config.strict, stacklevel=4)
    return config.replace(scoring="loss")


def _reference_router(config: CGGRConfig) -> Optional[Callable[..., Tensor]]:
    """The reference model of ``scoring='reducible'`` as a router: its first ``reference_layers``
    layers, final norm and head, or (None) the whole model."""
    if config.reference is None:
        return None
    if config.reference_layers is None:
        return WholeModelRouter(config.reference)
    router, _ = build_router(config.reference, config.reference_layers, strict=config.strict)
    return router


def transform(model: nn.Module, config: Optional[CGGRConfig] = None, **options: Any) -> CGGRModel:
    """Wrap ``model`` so that it trains with CGGR (eagerly or under any ``torch.compile``).

    Options are :class:`~cggr_compile.config.CGGRConfig`'s fields (``min_tokens_ratio``,
    ``router_layers``, ``scoring``, ``selection``, ``granularity``, ``warmup_steps``,
    ``dynamic_threshold``, ``threshold_sensitivity``, ``num_strata``, ``min_tokens_per_sequence``,
    ``router``, ...).
    """
    return CGGRModel(model, config, **options)
