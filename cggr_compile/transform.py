"""The module-level rewrite: router (no grad) -> score -> select -> main pass on the selection.

One batch, start to end (:meth:`CGGRModel.forward`):

1. ``plan_step`` (host, never traced): the schedule turns the step counter and the lagged mean
   confidence into an immutable :class:`~cggr_compile.schedule.RoutedPlan` (the ratio level,
   ``k`` rows, the device step counter...); the step reads only the plan, so a compiled forward
   specialises on its values and a whole schedule compiles at most ``num_levels`` times.
2. ``route``: the truncated router scores every position (``scoring.py``), rows or tokens are
   selected with static shapes.
3. the wrapped model runs on ``input_ids[idx]`` (and the mask and every per-row input sliced the
   same way), or on the whole batch with a token mask; the loss is the selective cross-entropy.
4. ``record_step`` (host, never traced): the mean confidence starts its non-blocking trip to the host
   for the dynamic threshold of a later step.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from . import scoring as S
from .config import CGGRConfig, ModelCall
from .errors import fall_back
from .exit import FitInputs, LearnedExit, hidden_size
from .metrics import selected_difficulty, skip_metrics, step_metrics, token_counts
from .ops.fused_scorer import fused_token_stats
from .passes.fuse_loss import choose_fused_loss, fused_main_pass, selective_loss
from .router import WholeModelRouter, build_router, model_call_for, refresh_router, unwrap_peft
from .schedule import RoutedPlan, Schedule
from .selection import Choice, Routing, choose, loss_count, loss_denominator


@dataclass
class CGGROutput(ModelOutput):
    """Output of a CGGR step for models whose forward returns a bare logits tensor."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None


def call_model(model: nn.Module, input_ids: Any, attention_mask: Any = None, labels: Any = None, **kwargs: Any) -> Any:
    """Call ``model`` passing only the arguments that are set (plain modules take no labels=)."""
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if labels is not None:
        kwargs["labels"] = labels
    out = model(input_ids=input_ids, **kwargs)
    return CGGROutput(logits=out) if isinstance(out, Tensor) else out


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


def score_positions(
    router_out: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor], causal: bool,
    scoring: str, stats: Optional[Callable[[Optional[Tensor]], S.TokenStats]] = None,
    reference: Optional[Tensor] = None,
) -> Routing:
    """Difficulty of every position from router logits ``[B, T, V]`` (or user difficulties ``[B, T]``).

    ``stats``, when given, computes the token statistics from the aligned labels instead of the
    logits (the fused scorer); ``router_out`` then only provides the ``[B, T]`` shape and device.
    ``reference`` (``[B, T]``) is the reference loss of ``scoring='reducible'``.
    """
    _check_router_output(router_out, attention_mask if attention_mask is not None else labels)
    target = S.aligned_labels(labels, causal) if labels is not None else None
    shape = router_out.shape[:2]
    valid = S.valid_positions(attention_mask, target, shape, causal, router_out.device)
    if stats is not None:
        st = stats(target)
        difficulty = S.token_difficulty(st, valid, scoring, labels is not None, reference)
        return Routing(target, valid, difficulty, S.batch_metrics(st, difficulty, valid))
    if router_out.dim() == 2:  # a user router that returns difficulties directly
        difficulty = torch.where(valid, router_out.float(), torch.zeros_like(router_out, dtype=torch.float32))
        w = valid.float()
        metrics = {"avg_difficulty": (difficulty * w).sum() / w.sum().clamp(min=1.0)}
        return Routing(target, valid, difficulty, metrics)
    stats = S.token_stats(router_out, target)
    difficulty = S.token_difficulty(stats, valid, scoring, labels is not None, reference)
    return Routing(target, valid, difficulty, S.batch_metrics(stats, difficulty, valid))


def score_by_exit(
    exit_: LearnedExit, state: Tensor, hidden: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
    causal: bool,
) -> Routing:
    """``scoring='predicted'``: every position's difficulty is the learned exit's prediction of the
    whole model's loss there, from the router's hidden states ``[B, T, H]`` (no vocabulary head)."""
    target = S.aligned_labels(labels, causal) if labels is not None else None
    valid = S.valid_positions(attention_mask, target, hidden.shape[:2], causal, hidden.device)
    with torch.no_grad():
        predicted = exit_.predict(state, hidden)
    difficulty = torch.where(valid, predicted, torch.zeros_like(predicted))
    w = valid.float()
    metrics = {"avg_difficulty": (difficulty * w).sum() / w.sum().clamp(min=1.0)}
    return Routing(target, valid, difficulty, metrics, hidden=hidden, ready=exit_.ready(state))


def _check_router_output(out: Any, like: Optional[Tensor]) -> None:
    """A router's output must be logits ``[B, T, V]`` or difficulties ``[B, T]`` of the batch's shape."""
    shape = tuple(out.shape) if isinstance(out, Tensor) else None
    if shape is None or len(shape) not in (2, 3) or (like is not None and shape[:2] != tuple(like.shape)):
        what = f"a tensor of shape {shape}" if shape is not None else type(out).__name__
        want = f" {tuple(like.shape)}" if like is not None else ""
        raise ValueError(
            f"cggr: the router returned {what}; a router must return logits [B, T, V] or one "
            f"difficulty per token [B, T], for the batch's (B, T){want}. For one score per sequence "
            "([B]), repeat it over the positions: score[:, None].expand(-1, input_ids.shape[1])."
        )


@contextlib.contextmanager
def _unsharded(model: nn.Module) -> Iterator[None]:
    """FSDP2: gather the root's own parameters (embeddings, final norm, head) for the router.

    The router runs the base model and the head directly, not the root module's forward, so the
    root's pre-forward hook that would gather them does not fire; the layers' hooks do.
    """
    if hasattr(model, "unshard") and hasattr(model, "reshard"):
        # The root must initialise first (FSDP2 initialises lazily at the first forward, and the
        # router reaches the layers before the root's forward runs). Private API, guarded.
        state = getattr(model, "_get_fsdp_state", None)
        if state is not None and hasattr(state(), "_lazy_init"):
            state()._lazy_init()
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def _router_modules(router: Any) -> list[nn.Module]:
    """The modules a router holds (its shallow clones of the model's layers, norm and head)."""
    if router is None:
        return []
    return [m for m in vars(router).values() if isinstance(m, nn.Module)]


def _is_per_row(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch


def per_row_inputs(kwargs: dict, batch: int) -> dict:
    """The keyword inputs with one entry per row (``position_ids``, ``token_type_ids``...)."""
    return {n: v for n, v in kwargs.items() if _is_per_row(v, batch)}


def slice_rows(value: Any, idx: Tensor, batch: int) -> Any:
    """``value[idx]`` for per-row tensors (leading dim == batch); anything else unchanged."""
    return value.index_select(0, idx) if _is_per_row(value, batch) else value


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


def check_reference_loss_is_read(config: CGGRConfig, reference_loss: Optional[Tensor]) -> None:
    """A batch's ``reference_loss`` under a scoring that ignores it is a mistake: say so."""
    if reference_loss is not None and config.scoring != "reducible":
        raise ValueError(
            f"cggr: the batch carries reference_loss, which only scoring='reducible' reads "
            f"(scoring={config.scoring!r}); set scoring='reducible' or drop the column."
        )


class CGGRModel(WrappedModel):
    """A model that trains with CGGR and otherwise behaves exactly like the model it wraps.

    ``parameters()`` yields the wrapped model's own tensors and ``state_dict()`` /
    ``load_state_dict()`` are the wrapped model's (same keys), so checkpoints move freely between
    the two. In training with labels and grad enabled, ``forward`` returns the model's usual output
    whose ``loss`` is the CGGR loss, plus ``selected_indices`` (rows, sequences granularity) or
    ``selected_mask`` (tokens) and ``cggr_metrics``. Call :meth:`step` once per optimizer step (or
    :meth:`attach_optimizer` once). ``loss_denominator=`` (a number or device tensor) replaces the
    count of selected tokens in the loss's mean, for gradient accumulation and data parallelism.
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
        # The positional order of a call (read here once: inspect is not traced by Dynamo).
        if call.is_hugging_face:
            self.__dict__["_positional"] = ("input_ids", "attention_mask", "labels")
        else:
            params = inspect.signature(unwrap_peft(model).forward).parameters  # PEFT passes them on
            self.__dict__["_positional"] = tuple(
                n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
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
        self.__dict__["exit"] = _learned_exit(model, router, config)

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

    @contextlib.contextmanager
    def swapped_tensors(self, replacements: dict[int, Tensor]) -> Iterator[None]:
        """While inside, every parameter / buffer slot of the wrapped model and of the routers'
        clones that holds a tensor in ``replacements`` (keyed by ``id``) holds its replacement.

        The backend's trace runs the routed step on its graph inputs this way, so no weight is
        baked into the graph as a constant; the slots are restored on exit."""
        roots = [self.model] + _router_modules(self.router) + _router_modules(self.__dict__["reference_router"])
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


    # -- the step -------------------------------------------------------------------------------
    def _fused_head(self, router: Any, plan: Optional[RoutedPlan] = None) -> Optional[nn.Linear]:
        """The router's linear head when the fused scorer op scores it here, else None.

        The eager transform (and torch.compile of it) fuses here, calling the op directly. The cggr
        backend traces a plan with ``fuse_scorer=False``, so the unfused head + token_stats; its
        graph pass (passes/fuse_scorer.py) then decides where the op pays. Same numbers either way,
        up to float rounding. Without a plan: the config's choice."""
        fuse = self.cggr_config.fused_scorer if plan is None else plan.fuse_scorer
        return getattr(router, "linear_head", None) if fuse else None

    @staticmethod
    def _fused_stats(router: Any, hidden: Tensor, head: nn.Linear, target: Optional[Tensor]) -> S.TokenStats:
        # Under autocast the op's own autocast rule (ops/fused_scorer.py) casts the inputs to the
        # region's dtype, as the unfused head would run.
        _, entropy, p1, p2, nll = fused_token_stats(hidden, head.weight, head.bias, target, router.softcap)
        return S.TokenStats(entropy, p1, p2, nll)

    def reference_nll(self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor,
                      *, plan: Optional[RoutedPlan] = None, **rows: Any) -> Tensor:
        """The reference model's loss at every position ``[B, T]`` (aligned like the router's scores)."""
        ref = self.__dict__["reference_router"]
        target = S.aligned_labels(labels, self.causal)
        with torch.no_grad():
            head = self._fused_head(ref, plan)
            if head is None:
                return S.token_stats(ref(input_ids, attention_mask, **rows), target).nll
            return self._fused_stats(ref, ref.hidden(input_ids, attention_mask, **rows), head, target).nll

    def _reference(self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
                   given: Optional[Tensor], rows: dict, plan: Optional[RoutedPlan] = None) -> Optional[Tensor]:
        """``scoring='reducible'``'s reference loss ``[B, T]``: the batch's, else the reference model's."""
        check_reference_loss_is_read(self.cggr_config, given)
        if self.cggr_config.scoring != "reducible":
            return None
        if given is not None:
            return S.reference_per_position(given, input_ids.shape)
        if self.__dict__["reference_router"] is not None and labels is not None:
            return self.reference_nll(input_ids, attention_mask, labels, plan=plan, **rows)
        return None

    def route(
        self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
        reference_loss: Optional[Tensor] = None, *, plan: Optional[RoutedPlan] = None, **rows: Any,
    ) -> Routing:
        """Run the router and score every position (no grad). ``reference_loss`` (``[B]`` or
        ``[B, T]``) is the batch's reference loss for ``scoring='reducible'``; ``plan`` says
        whether the fused scorer op runs here (default: the config's ``fused_scorer``)."""
        cfg = self.cggr_config
        labels = self._cggr_labels(labels)
        if self.exit is not None:
            with torch.no_grad(), _unsharded(self.model):
                hidden = self.router.hidden(input_ids, attention_mask, **rows)
            state = plan.exit_state if plan is not None and plan.exit_state is not None \
                else self.exit.state_on(input_ids.device)
            return score_by_exit(self.exit, state, hidden, attention_mask, labels, self.causal)
        with torch.no_grad(), _unsharded(self.model):
            reference = self._reference(input_ids, attention_mask, labels, reference_loss, rows, plan)
            head = self._fused_head(self.router, plan)
            if head is None:
                out = self.router(input_ids, attention_mask, **rows)
                return score_positions(out, attention_mask, labels, self.causal, cfg.scoring, reference=reference)
            hidden = self.router.hidden(input_ids, attention_mask, **rows)

            def fused(target: Optional[Tensor]) -> S.TokenStats:
                return self._fused_stats(self.router, hidden, head, target)

            return score_positions(hidden, attention_mask, labels, self.causal, cfg.scoring, stats=fused,
                                   reference=reference)

    def sequence_difficulty(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
        **rows: Any,
    ) -> Tensor:
        """The router's per-sequence difficulty ``[B]`` (mean over valid positions)."""
        check_batch(input_ids, labels, attention_mask)
        self._refresh_routers()
        reference_loss = rows.pop("reference_loss", None)
        r = self.route(input_ids, attention_mask, labels, reference_loss, **rows)
        return S.sequence_difficulty(r.difficulty, r.valid)

    # -- the model's calling convention (config.ModelCall) ----------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> tuple[Any, Any, Any, dict]:
        """``(input_ids, attention_mask, labels, other kwargs)`` of a call, by the model's names.

        Hugging Face models keep the positional order ``(input_ids, attention_mask, labels)``;
        others bind positional arguments through their forward's signature (``gpt(idx, targets)``).
        A model whose forward takes no labels or mask gets CGGR's own ``labels=`` /
        ``attention_mask=``."""
        call: ModelCall = self.__dict__["model_call"]
        kwargs = dict(kwargs)
        names = self.__dict__["_positional"]
        if len(args) > len(names):
            raise TypeError(
                f"cggr: {type(self.model).__name__} takes {len(names)} positional inputs ({', '.join(names)}), "
                f"got {len(args)}; pass the others by name."
            )
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"cggr: {name} was given both positionally and by name.")
            kwargs[name] = value
        kwargs = call.canonical(kwargs)
        return kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None), kwargs.pop("labels", None), kwargs

    def _cggr_labels(self, labels: Optional[Tensor]) -> Optional[Tensor]:
        """The labels with the model's ignore index as CGGR's (-100)."""
        ignore = self.__dict__["model_call"].ignore_index
        if labels is None or ignore == S.IGNORE_INDEX:
            return labels
        return torch.where(labels == ignore, torch.full_like(labels, S.IGNORE_INDEX), labels)

    def _call_plain(self, input_ids: Any, attention_mask: Any, labels: Any, kwargs: dict) -> Any:
        """The model called as its user calls it, by its own names; its output unchanged."""
        call: ModelCall = self.__dict__["model_call"]
        kwargs = dict(kwargs)
        if call.attention_mask is not None and attention_mask is not None:
            kwargs[call.attention_mask] = attention_mask
        if call.labels is not None and labels is not None:
            kwargs[call.labels] = labels
        return self.model(**{call.inputs: input_ids}, **kwargs)

    def _main_pass(self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
                   **kwargs: Any) -> Any:
        """The model on the rows (or batch) that train: an output with ``.logits`` and item access.

        ``labels`` are the model's own (its ignore index); they reach the model only where
        ``ModelCall.labels_to_model`` says so (nanoGPT), never a Hugging Face model (its loss would
        be computed for nothing)."""
        call: ModelCall = self.__dict__["model_call"]
        if self.__dict__["fused_loss"]:  # no logits: the loss is formed from the hidden states
            return fused_main_pass(self.__dict__["fused_loss"], input_ids, attention_mask, kwargs, CGGROutput)
        if self.__dict__["_hf_call"]:
            return call_model(self.model, input_ids, attention_mask, **kwargs)
        labels = labels if call.labels_to_model else None
        if call.logits_module is not None:
            out = self.model.get_submodule(call.logits_module)(input_ids)
        else:
            out = self._call_plain(input_ids, attention_mask, labels, kwargs)
        if isinstance(out, (tuple, list)):
            if call.logits_index is None:
                raise TypeError(
                    f"cggr: {type(self.model).__name__} returned a {type(out).__name__}; say where its "
                    "logits are: model_call=cggr_compile.ModelCall(..., logits_index=0, loss_index=1)."
                )
            return CGGROutput(logits=out[call.logits_index])
        return CGGROutput(logits=out) if isinstance(out, Tensor) else out

    def _user_output(self, out: Any) -> Any:
        """A training step's output in the model's own form: a tuple where the model returns one
        (nanoGPT's ``(logits, loss)``: the selected rows' logits and CGGR's loss)."""
        call: ModelCall = self.__dict__["model_call"]
        if call.logits_index is None:
            return out
        loss_index = call.loss_index if call.loss_index is not None else call.logits_index + 1
        items: list[Any] = [None] * (max(call.logits_index, loss_index) + 1)
        items[call.logits_index] = out.logits
        items[loss_index] = out.loss
        return tuple(items)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(...)`` with CGGR in training: the model's own arguments (``ModelCall`` names
        them: ``input_ids=`` / ``labels=``, or nanoGPT's ``(idx, targets)``...)."""
        input_ids, attention_mask, labels, kwargs = self._bind(args, kwargs)
        if not (self.model.training and torch.is_grad_enabled() and labels is not None):
            # eval, no_grad or no labels: exactly the plain model (which knows no reference_loss).
            kwargs.pop("reference_loss", None)
            if not self.__dict__["_hf_call"]:
                return self._call_plain(input_ids, attention_mask, labels, kwargs)
            out = call_model(self.model, input_ids, attention_mask, labels, **kwargs)
            return out.logits if isinstance(out, CGGROutput) else out
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
        return self._user_output(out)

    def routed_step(
        self, plan: RoutedPlan, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor, kwargs: dict
    ) -> tuple[Any, dict[str, Any], Optional[Tensor]]:
        """One routed training step as ``plan`` says: router, selection, main pass on the
        selection, selective loss, and (``scoring='predicted'``) the learned exit's fit. Returns the
        output (with ``loss``, the selection and ``cggr_metrics``), the metrics and the exit's new
        state (None without an exit; :meth:`record_step` keeps it). A function of ``plan`` and the
        batch only (the backend traces it, with the plan's step counter and exit state graph inputs)."""
        cfg = self.cggr_config
        b = input_ids.shape[0]
        kwargs = dict(kwargs)
        denominator = kwargs.pop("loss_denominator", None)
        reference_loss = kwargs.pop("reference_loss", None)
        r, choice = self._route_and_choose(plan, input_ids, attention_mask, labels, reference_loss,
                                           per_row_inputs(kwargs, b))
        idx, weight = choice.selection, choice.weight
        fits = self.exit is not None
        if cfg.granularity == "sequences":
            sliced = {n: slice_rows(v, idx, b) for n, v in kwargs.items()}
            mask_k = attention_mask.index_select(0, idx) if attention_mask is not None else None
            labels_k = labels.index_select(0, idx) if self.model_call.labels_to_model else None
            out = self._main_pass(input_ids.index_select(0, idx), mask_k, labels_k, **sliced)
            denominator = loss_denominator(weight, denominator, cfg, loss_count(r, cfg))
            loss = selective_loss(self.__dict__["fused_loss"], out, r.target.index_select(0, idx), weight,
                                  denominator, return_token_loss=fits)
            out["selected_indices"] = idx
        else:  # the token mask is both the selection and the weight
            out = self._main_pass(input_ids, attention_mask, labels, **kwargs)
            denominator = loss_denominator(weight, denominator, cfg)
            loss = selective_loss(self.__dict__["fused_loss"], out, r.target, weight, denominator,
                                  return_token_loss=fits)
            out["selected_mask"] = weight
        exit_state, exit_metrics = None, {}
        if fits:
            loss, token_loss = loss
            exit_state, exit_metrics = self.exit.fit(plan.exit_state, exit_fit_inputs(r, choice, cfg), token_loss)
        out["loss"] = loss
        metrics = self._step_metrics(r, choice, plan, exit_metrics)
        out["cggr_metrics"] = metrics
        return out, metrics, exit_state

    def _route_and_choose(
        self, plan: RoutedPlan, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
        reference_loss: Optional[Tensor], rows: dict,
    ) -> tuple[Routing, Choice]:
        """The router's scores and the selection (``selection.choose``): what :meth:`routed_step`
        and :meth:`select` share."""
        r = self.route(input_ids, attention_mask, labels, reference_loss, plan=plan, **rows)
        return r, choose(r, plan, self.cggr_config)

    def _step_metrics(self, r: Routing, choice: Choice, plan: RoutedPlan,
                      exit_metrics: Optional[dict[str, Tensor]] = None) -> dict[str, Any]:
        cfg = self.cggr_config
        return step_metrics(
            cfg, self.schedule, r.metrics, plan.ratio, plan.k, choice.selection,
            selected_difficulty=selected_difficulty(r.difficulty, choice.weight, choice.selection, cfg.granularity),
            **token_counts(choice.weight, r.valid), **skip_metrics(choice.skipped, r.valid, cfg.granularity),
            **(exit_metrics or {}),
        )

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
        b = input_ids.shape[0]
        self.plan_step(b, input_ids.device)
        plan = self._planned  # see forward: static k under compile
        reference_loss = kwargs.pop("reference_loss", None)
        r, choice = self._route_and_choose(plan, input_ids, attention_mask, labels, reference_loss,
                                           per_row_inputs(kwargs, b))
        selection, weight = choice.selection, choice.weight
        # Whether this selection ranked by the exit (a forward's fit reports the same from its state).
        exit_ready = {"exit_ready": r.ready.float()} if r.ready is not None else None
        metrics = self._step_metrics(r, choice, plan, exit_ready)
        if record:
            self.record_step(metrics)
        if not return_fit_inputs:
            return selection, weight, metrics
        fit = exit_fit_inputs(r, choice, self.cggr_config) if self.exit is not None else None
        return selection, weight, metrics, fit

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


def exit_fit_inputs(r: Routing, choice: Choice, config: CGGRConfig) -> FitInputs:
    """What the learned exit fits on after the main pass (``cggr_compile.exit``): the trained
    positions' hidden states and predictions, and each one's fit weight.

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


def _learned_exit(model: nn.Module, router: Any, config: CGGRConfig) -> Optional[LearnedExit]:
    """``scoring='predicted'``'s exit over the router's hidden state, or None for other scorings."""
    if config.scoring != "predicted":
        return None
    if not callable(getattr(router, "hidden", None)):
        what = "your router=" if config.router is not None else f"the router CGGR built for {type(model).__name__}"
        raise ValueError(
            f"scoring='predicted' fits its exit on the router's hidden states, and {what} gives none "
            "(only logits or difficulties); drop router= (use the model's own first layers, or "
            "router_spec= for a custom layout), or choose a head-based scoring."
        )
    return LearnedExit(hidden_size(router, model), config.exit_decay, config.exit_ridge, config.exit_min_fits)


def _scoring_for_router(config: CGGRConfig, router: Any, model: nn.Module) -> CGGRConfig:
    """The learned exit (the default scoring) needs the router's hidden states. A router CGGR had to
    build from the whole model (a layout it does not know; already a warned fallback) gives none:
    then score by the router's loss instead, with a warning (an error under ``strict``). A user's
    ``router=`` with ``scoring='predicted'`` is an error (``_learned_exit``)."""
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
