"""What a routed step trains on, from the router's scores: the selection, the loss weight of its
positions, and the count the loss's sum is divided by (local, the caller's, or across ranks).

All of it is traced into the step (static shapes, no host synchronisation); the numbers it reads
from the schedule come from the step's :class:`~cggr_compile.schedule.RoutedPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from . import scoring as S
from .config import CGGRConfig
from .distributed import data_parallel_world, rank_normaliser
from .schedule import RoutedPlan


@dataclass
class Routing:
    """What the router decided for one batch (all device tensors)."""

    target: Optional[Tensor]  # labels aligned with positions, [B, T]
    valid: Tensor  # [B, T] bool
    difficulty: Tensor  # [B, T] float32
    metrics: dict[str, Tensor]
    # scoring='predicted': the router's hidden states [B, T, H] (the exit's fit reads the trained
    # rows' ones after the main pass) and whether the exit ranks yet (bool device scalar).
    hidden: Optional[Tensor] = None
    ready: Optional[Tensor] = None


class Choice(NamedTuple):
    """What :func:`choose` decided (device tensors).

    ``selection``: row indices ``[k]`` (sequences) or the token mask ``[B, T]`` (tokens).
    ``weight``: the loss weight of the selected rows' positions (``[k, T]``) or of the tokens.
    ``fit_weight``: the selected rows' positions' weight in the learned exit's fit (``[k, T]``: the
    inverse of the row's probability of being drawn, so the fit is the whole batch's regression), or
    None: the loss weight.
    ``skipped``: ``selection='truncation'``: the rows ``[B]`` (tokens ``[B, T]``) it dropped as too
    hard; else None."""

    selection: Tensor
    weight: Tensor
    fit_weight: Optional[Tensor] = None
    skipped: Optional[Tensor] = None


def choose(r: Routing, plan: RoutedPlan, config: CGGRConfig) -> Choice:
    """The selection from the router's scores, and the loss weight of its positions.

    Sequences: row indices ``[k]`` and the selected rows' valid positions ``[k, T]``
    (``selection='importance'``: float weights ``1 / (k p)`` on the drawn rows' valid
    positions, from the same probabilities the rows were drawn with; ``truncation``: none on a
    probe of a skipped row). Tokens: the token mask ``[B, T]``, which is also the weight.
    """
    cfg = config
    if cfg.granularity != "sequences":
        difficulty = _uniform_until_ready(r.difficulty, r.valid, r.ready, plan.step_tensor, cfg.seed)
        skip = None
        if cfg.selection == "truncation":
            skip = truncation_skips_of(r.difficulty, r.valid, S.token_budget(r.valid, plan.token_ratio), r.ready, cfg)
        mask = S.select_tokens(
            difficulty, r.valid, plan.token_ratio, cfg.selection, cfg.num_strata,
            cfg.min_tokens_per_sequence, cfg.seed, plan.step_tensor, skip=skip,
        )
        return Choice(mask, mask, skipped=skip)
    rows_valid = r.valid.any(-1)
    if cfg.selection == "truncation":
        skip = truncation_skips_of(S.sequence_difficulty(r.difficulty, r.valid), rows_valid, plan.k, r.ready, cfg)
        idx, inclusion = S.truncated_draw(rows_valid, skip, plan.k, S.probe_rows(plan.k, cfg.truncation_probe),
                                          cfg.seed, plan.step_tensor)
        drawn_valid = r.valid.index_select(0, idx)
        # A probe that drew a skipped row runs in the main pass for the exit's fit only: no loss weight.
        trained = drawn_valid & ~skip.index_select(0, idx).unsqueeze(-1)
        return Choice(idx, trained, drawn_valid.float() / inclusion.clamp(min=1e-12).unsqueeze(-1), skip)
    seq = _uniform_until_ready(S.sequence_difficulty(r.difficulty, r.valid), rows_valid, r.ready,
                               plan.step_tensor, cfg.seed)
    if cfg.selection == "importance":
        # A cold exit: the floor alone (p by token count, i.e. a plain random subset).
        floor = cfg.importance_floor if r.ready is None else \
            torch.where(r.ready, float(cfg.importance_floor), 1.0)
        probs = S.importance_probabilities(seq, r.valid.sum(-1), floor)
        idx = S.sample_importance(probs, plan.k, cfg.seed, plan.step_tensor)
        return Choice(idx, S.importance_weights(r.valid.index_select(0, idx), probs, idx))
    idx = S.select_sequences(seq, plan.k, cfg.selection, cfg.num_strata, cfg.seed, plan.step_tensor)
    return Choice(idx, r.valid.index_select(0, idx))


def truncation_skips_of(scores: Tensor, valid: Tensor, keep: int | Tensor, ready: Optional[Tensor],
                        cfg: CGGRConfig) -> Tensor:
    """Truncation's dropped rows or tokens under ``cfg``'s rule; none while a learned exit is cold
    (``ready`` false: its scores say nothing yet; None: no exit)."""
    skip = S.truncation_skips(scores, valid, keep, cfg.truncation_share, cfg.truncation_spread)
    return skip if ready is None else skip & ready


def _uniform_until_ready(difficulty: Tensor, valid: Tensor, ready: Optional[Tensor], step: Optional[Tensor],
                         seed: int) -> Tensor:
    """What the selection ranks by: ``difficulty`` (per row ``[B]`` or per token ``[B, T]``), or,
    while a learned exit is not fitted yet (``ready`` false), seeded uniform numbers in its place, so
    that every rule then picks a uniform random subset (SPEC.md, Router). Entries without a valid
    position keep their value (``-inf`` rows are never chosen). No host sync: a ``where`` on the
    device flag."""
    if ready is None:
        return difficulty
    dev = difficulty.device
    step = step if step is not None else torch.zeros((), dtype=torch.int64, device=dev)
    noise = S.hash_uniform(torch.arange(difficulty.numel(), device=dev), seed + 1, step).view(difficulty.shape)
    return torch.where(~ready & valid, noise, difficulty)


def loss_count(r: Routing, config: CGGRConfig) -> Optional[Tensor]:
    """``selection='importance'``: the batch's valid tokens (whose mean loss the weighted loss
    estimates); otherwise None (the selected ones)."""
    return r.valid.sum() if config.selection == "importance" else None


def loss_denominator(weight: Tensor, given: Any, config: CGGRConfig, count: Optional[Tensor] = None) -> Any:
    """The loss's denominator: the caller's, else the data-parallel count, else the local one.

    ``count`` is the local count (default: the selected tokens, ``weight.sum()``; see
    :func:`loss_count`). Under data parallelism (``data_parallel_normalize``) it is the count over
    all ranks divided by the world size (``cggr_compile.distributed.rank_normaliser``).
    """
    if given is not None:
        return given
    if not config.data_parallel_normalize or data_parallel_world() == 1:
        return count
    return rank_normaliser(weight.sum() if count is None else count)
