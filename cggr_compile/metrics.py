"""The one metrics dict of a CGGR step, for every entry point (the transform, the backend, the
original library's classes): the router's batch statistics, the selection and its counts, and the
schedule's state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor

from .config import CGGRConfig

if TYPE_CHECKING:
    from .schedule import Schedule


def selection_key(granularity: str) -> str:
    """The one name of a step's selection in outputs and metrics (transform, backend, Trainer):
    ``selected_indices`` (the row indices ``[k]``, sequences) or ``selected_mask`` (``[B, T]``, tokens)."""
    return "selected_indices" if granularity == "sequences" else "selected_mask"


def token_counts(weight: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """``tokens_selected`` (positions with a nonzero loss weight) and ``tokens_total`` (valid positions)."""
    selected = weight.sum() if weight.dtype == torch.bool else (weight != 0).sum()
    return {"tokens_selected": selected, "tokens_total": valid.sum()}


def skip_metrics(skipped: Optional[Tensor], valid: Tensor, granularity: str) -> dict[str, Tensor]:
    """``selection='truncation'``: ``skipped``, the rows ``[B]`` (tokens ``[B, T]``) it dropped as
    too hard (look at them: they are the batch's junk, or its hardest text), and ``skipped_share``, their
    share of the valid rows (tokens). Empty for the other selections."""
    if skipped is None:
        return {}
    among = valid.any(-1) if granularity == "sequences" else valid
    return {"skipped": skipped, "skipped_share": skipped.sum().float() / among.sum().clamp(min=1).float()}


def selected_difficulty(difficulty: Tensor, weight: Tensor, selection: Tensor, granularity: str) -> Tensor:
    """The selection's mean difficulty, beside the batch's (``avg_difficulty``): under 'combined'
    (z-scores) the batch's is ~0 by construction, the gap is what the router did."""
    rows = difficulty.index_select(0, selection) if granularity == "sequences" else difficulty
    w = (weight != 0).to(torch.float32)
    return (rows.float() * w).sum() / w.sum().clamp(min=1.0)


def step_metrics(
    config: CGGRConfig, schedule: "Schedule", stats: Mapping[str, Any], ratio: float, k: Optional[int] = None,
    selection: Optional[Tensor] = None, **values: Any,
) -> dict[str, Any]:
    """A step's metrics: ``stats`` (the router's device statistics: ``avg_confidence``...), the
    selection under :func:`selection_key` (when given), ``step``, ``token_ratio``, ``k`` (when
    given), ``values`` (``tokens_selected``, ``tokens_total``, ``selected_difficulty``...) and the
    config's ``selection`` and ``scoring``.

    ``schedule.step`` is read here, from the schedule: handed over as an int argument, Dynamo
    specialised on its value and recompiled at every step (tests/test_transform.py counts the
    graphs)."""
    metrics: dict[str, Any] = dict(stats)
    if selection is not None:
        metrics[selection_key(config.granularity)] = selection
    metrics["step"] = schedule.step
    metrics["token_ratio"] = ratio
    if k is not None:
        metrics["k"] = k
    metrics.update(values)
    metrics.update(selection=config.selection, scoring=config.scoring)
    return metrics
