"""Rank statistics the benchmarks report: Spearman correlation, checkpoint noise, the learnability probe,
and the machine's load (other processes' CPU use skews CPU timings)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def rankdata(x) -> np.ndarray:
    """Ranks 0..n-1, ties get the average of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=ranks) / counts)[inv]


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of the average ranks); NaN if either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) < 2:
        return float("nan")
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def load_avg() -> list | None:
    """The machine's 1/5/15-minute load averages (other processes' CPU use skews CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def checkpoint_std(curve: list[dict], window: int) -> float | None:
    """Standard deviation (ddof 0) of the held-out loss over the last ``window`` checkpoints."""
    ys = [c["heldout_loss"] for c in curve[1:]][-window:]
    return round(float(np.std(ys)), 5) if len(ys) >= 2 else None


def learnability_probe(initial: torch.Tensor, final: torch.Tensor, scores: dict) -> dict:
    """How per-sequence scores taken at the start relate to the held-out loss that then fell.

    ``drop`` = initial - final loss of each held-out sequence (never trained on). For each score:
    its Spearman correlation with the drop, and the mean drop of the quarter it ranks highest (what
    a top-k selection by it would have aimed at) against the mean drop of all sequences.
    """
    drop = (initial - final).double()
    n = drop.numel()
    out = dict(mean_drop=round(float(drop.mean()), 5), sequences=n)
    q = max(1, n // 4)
    for name, sc in scores.items():
        sc = sc.double()
        top = torch.topk(sc, q).indices
        out[name] = dict(spearman_with_drop=round(spearman(sc.numpy(), drop.numpy()), 4),
                         top_quarter_mean_drop=round(float(drop[top].mean()), 5))
    return out

