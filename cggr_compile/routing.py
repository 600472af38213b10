"""The router's side of a routed step: run the router under no-grad and score every position.

One batch's routing, in order (:func:`route`): the labels with CGGR's ignore index
(:func:`cggr_labels`); then either the learned exit's prediction from the router's hidden states
(:func:`score_by_exit`), or the reference loss of ``scoring='reducible'``
(:func:`reducible_reference`) and the router's head, fused (:func:`fused_head`,
:func:`fused_stats`) or not, turned into difficulties (:func:`score_positions`). :func:`route_and_choose` adds the selection
(``selection.choose``), which is what a training step and ``CGGRModel.select`` share;
:func:`sequence_difficulty` is the routing's per-sequence mean.

The functions take the core (``CGGRModel``, seen through :class:`RoutingCore`) explicitly: this
module never imports ``transform.py``, which imports it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import Tensor, nn

from . import scoring as S
from .config import CGGRConfig, ModelCall
from .exit import LearnedExit
from .ops.fused_scorer import fused_token_stats
from .schedule import RoutedPlan
from .selection import Choice, Routing, choose


class RoutingCore(Protocol):
    """What routing reads of the core (``CGGRModel``'s attributes of the same names; the plain ones,
    not submodules, are read from its ``__dict__`` as the class itself reads them)."""

    cggr_config: CGGRConfig
    model: nn.Module
    router: Any
    reference_router: Optional[Callable[..., Tensor]]
    exit: Optional[LearnedExit]
    causal: bool
    model_call: ModelCall


def check_reference_loss_is_read(config: CGGRConfig, reference_loss: Optional[Tensor]) -> None:
    """A batch's ``reference_loss`` under a scoring that ignores it is a mistake: say so."""
    if reference_loss is not None and config.scoring != "reducible":
        raise ValueError(
            f"cggr: the batch carries reference_loss, which only scoring='reducible' reads "
            f"(scoring={config.scoring!r}); set scoring='reducible' or drop the column."
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
def unsharded(model: nn.Module) -> Iterator[None]:
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


def cggr_labels(call: ModelCall, labels: Optional[Tensor]) -> Optional[Tensor]:
    """The labels with the model's ignore index as CGGR's (-100): the scoring's targets and the
    selective loss read -100 whatever the model's own convention (nanoGPT's -1)."""
    ignore = call.ignore_index
    if labels is None or ignore == S.IGNORE_INDEX:
        return labels
    return torch.where(labels == ignore, torch.full_like(labels, S.IGNORE_INDEX), labels)


def fused_head(config: CGGRConfig, router: Any, plan: Optional[RoutedPlan] = None) -> Optional[nn.Linear]:
    """The router's linear head when the fused scorer op scores it here, else None.

    The eager transform (and torch.compile of it) fuses here, calling the op directly. The cggr
    backend traces a plan with ``fuse_scorer=False``, so the unfused head + token_stats; its
    graph pass (passes/fuse_scorer.py) then decides where the op pays. Same numbers either way,
    up to float rounding. Without a plan: the config's choice."""
    fuse = config.fused_scorer if plan is None else plan.fuse_scorer
    return getattr(router, "linear_head", None) if fuse else None


def fused_stats(router: Any, hidden: Tensor, head: nn.Linear, target: Optional[Tensor]) -> S.TokenStats:
    """The token statistics of ``head(hidden)`` by the fused scorer op: the ``B x T x V`` logits are
    never written."""
    # Under autocast the op's own autocast rule (ops/fused_scorer.py) casts the inputs to the
    # region's dtype, as the unfused head would run.
    _, entropy, p1, p2, nll = fused_token_stats(hidden, head.weight, head.bias, target, router.softcap)
    return S.TokenStats(entropy, p1, p2, nll)


def reference_nll(core: RoutingCore, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor,
                  *, plan: Optional[RoutedPlan] = None, **rows: Any) -> Tensor:
    """The reference model's loss at every position ``[B, T]`` (aligned like the router's scores),
    what ``scoring='reducible'`` subtracts when the batch carries no reference loss."""
    ref = core.__dict__["reference_router"]
    target = S.aligned_labels(labels, core.causal)
    with torch.no_grad():
        head = fused_head(core.cggr_config, ref, plan)
        if head is None:
            return S.token_stats(ref(input_ids, attention_mask, **rows), target).nll
        return fused_stats(ref, ref.hidden(input_ids, attention_mask, **rows), head, target).nll


def reducible_reference(core: RoutingCore, input_ids: Tensor, attention_mask: Optional[Tensor],
                        labels: Optional[Tensor], given: Optional[Tensor], rows: dict,
                        plan: Optional[RoutedPlan] = None) -> Optional[Tensor]:
    """``scoring='reducible'``'s reference loss ``[B, T]``: the batch's, else the reference model's;
    None for the other scorings (a batch's reference loss there is an error)."""
    check_reference_loss_is_read(core.cggr_config, given)
    if core.cggr_config.scoring != "reducible":
        return None
    if given is not None:
        return S.reference_per_position(given, input_ids.shape)
    if core.__dict__["reference_router"] is not None and labels is not None:
        return reference_nll(core, input_ids, attention_mask, labels, plan=plan, **rows)
    return None


def route(
    core: RoutingCore, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
    reference_loss: Optional[Tensor] = None, *, plan: Optional[RoutedPlan] = None, **rows: Any,
) -> Routing:
    """Run the router and score every position (no grad). ``reference_loss`` (``[B]`` or
    ``[B, T]``) is the batch's reference loss for ``scoring='reducible'``; ``plan`` says
    whether the fused scorer op runs here (default: the config's ``fused_scorer``) and carries the
    learned exit's state."""
    cfg = core.cggr_config
    labels = cggr_labels(core.__dict__["model_call"], labels)
    if core.exit is not None:
        with torch.no_grad(), unsharded(core.model):
            hidden = core.router.hidden(input_ids, attention_mask, **rows)
        state = plan.exit_state if plan is not None and plan.exit_state is not None \
            else core.exit.state_on(input_ids.device)
        return score_by_exit(core.exit, state, hidden, attention_mask, labels, core.causal)
    with torch.no_grad(), unsharded(core.model):
        reference = reducible_reference(core, input_ids, attention_mask, labels, reference_loss, rows, plan)
        head = fused_head(cfg, core.router, plan)
        if head is None:
            out = core.router(input_ids, attention_mask, **rows)
            return score_positions(out, attention_mask, labels, core.causal, cfg.scoring, reference=reference)
        hidden = core.router.hidden(input_ids, attention_mask, **rows)

        def fused(target: Optional[Tensor]) -> S.TokenStats:
            return fused_stats(core.router, hidden, head, target)

        return score_positions(hidden, attention_mask, labels, core.causal, cfg.scoring, stats=fused,
                               reference=reference)


def sequence_difficulty(core: RoutingCore, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                        labels: Optional[Tensor] = None, **rows: Any) -> Tensor:
    """The router's per-sequence difficulty ``[B]`` (mean over valid positions), for samplers and
    studies that rank whole sequences; the batch's ``reference_loss`` is among ``rows``."""
    reference_loss = rows.pop("reference_loss", None)
    r = route(core, input_ids, attention_mask, labels, reference_loss, **rows)
    return S.sequence_difficulty(r.difficulty, r.valid)


def route_and_choose(
    core: RoutingCore, plan: RoutedPlan, input_ids: Tensor, attention_mask: Optional[Tensor],
    labels: Optional[Tensor], reference_loss: Optional[Tensor], rows: dict,
) -> tuple[Routing, Choice]:
    """The router's scores and the selection (``selection.choose``): what a routed training step
    and ``CGGRModel.select`` share."""
    r = route(core, input_ids, attention_mask, labels, reference_loss, plan=plan, **rows)
    return r, choose(r, plan, core.cggr_config)
