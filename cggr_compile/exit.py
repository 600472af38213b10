"""The learned exit: the router's last hidden state -> the whole model's own next-token loss.

``scoring='predicted'`` replaces the router's vocabulary head by a linear map (ridge regression,
``H + 1`` weights with the intercept) from the hidden state after the router's ``K`` layers to the
per-token loss the whole model will have there. A row's difficulty is the mean prediction over its
valid positions. It is fitted online, inside the training step, from what the step has anyway:

* the router's hidden states of the rows the main pass trains (computed for scoring, no recompute);
* the main pass's detached per-token losses of those rows (every row while ``k = B``; the tokens
  granularity computes every position's loss, so every valid position fits);
* weights that undo a non-uniform selection: the importance selection's ``1 / (k p)``, so the fit
  estimates the whole batch's regression, not the selected rows'. Top-k, stratified and the
  like pick rows by the exit's own score and cannot be reweighted: their fit sees only what was
  chosen (SPEC.md, Scoring; ``docs/learnability.md``).

The statistics are sufficient ones, decayed by ``exit_decay`` per fit (a window of about
``1 / (1 - decay)`` fits): ``G = sum w x x^T`` and ``m = sum w x y`` with ``x = [h, 1]``. Each fit
solves ``(S G S + ridge I) v = S m`` with ``S`` the inverse square roots of ``diag(G)`` (so the ridge
is scale-free over features of very different sizes) by a Cholesky factorisation, and the weights
are ``S v``. Everything is static-shaped device math: no host synchronisation, it traces into the
backend's graph and replays under CUDA graphs.

All of an exit's state is one float32 vector (:class:`ExitLayout`), so that a graph takes it as one
input and returns its successor as one output, and a checkpoint saves it as one tensor. It is not a
model parameter: ``parameters()`` and ``state_dict()`` stay the model's own.

Faults: a position whose loss or hidden state is not finite never enters the fit; a prediction that
is not finite is 0 (it never reaches a selection); a solve that fails (not positive definite, or
non-finite weights) keeps the previous weights and drops the statistics' history, refitting from
the current batch on; a state that is not finite (a corrupted checkpoint) starts cold again. Until
the exit has ``exit_min_fits`` fits over at least ``H + 1`` tokens of weight (a cold start, or a
resume without its state), :attr:`ready` is false and the selection is uniform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .config import CGGRConfig

# Per fit, the running agreement metrics move this far towards the new value (bias-corrected).
AGREEMENT_DECAY = 0.9
# The scalar slots at the end of the state vector, in order.
_SCALARS = ("fits", "weight_sum", "solved", "rank_num", "rank_den", "r2_num", "r2_den", "failed_solves")


class FitInputs(NamedTuple):
    """What one fit needs besides the main pass's per-token loss (device tensors, detached).

    ``hidden``: the router's hidden states of the trained rows ``[R, T, H]``; ``predicted``: the
    exit's prediction for them before this fit ``[R, T]`` (for the agreement metrics);
    ``weight``: each position's fit weight ``[R, T]`` (0 where it is not valid)."""

    hidden: Tensor
    predicted: Tensor
    weight: Tensor


@dataclass(frozen=True)
class ExitLayout:
    """Where each part of the exit's state lives in its flat float32 vector, for ``hidden`` features."""

    hidden: int

    @property
    def dim(self) -> int:
        return self.hidden + 1  # the intercept's constant feature is the last

    @property
    def size(self) -> int:
        d = self.dim
        return d * d + 2 * d + len(_SCALARS)

    def gram(self, state: Tensor) -> Tensor:
        d = self.dim
        return state[: d * d].view(d, d)

    def moment(self, state: Tensor) -> Tensor:
        d = self.dim
        return state[d * d: d * d + d]

    def weights(self, state: Tensor) -> Tensor:
        d = self.dim
        return state[d * d + d: d * d + 2 * d]

    def scalar(self, state: Tensor, name: str) -> Tensor:
        d = self.dim
        return state[d * d + 2 * d + _SCALARS.index(name)]

    def pack(self, gram: Tensor, moment: Tensor, weights: Tensor, scalars: dict[str, Tensor]) -> Tensor:
        parts = [gram.reshape(-1), moment, weights, torch.stack([scalars[n].float() for n in _SCALARS])]
        return torch.cat(parts)

    def new_state(self, device: torch.device | str = "cpu") -> Tensor:
        """A cold exit: no statistics, zero weights, not ready."""
        return torch.zeros(self.size, dtype=torch.float32, device=device)


def predict(layout: ExitLayout, state: Tensor, hidden: Tensor) -> Tensor:
    """The predicted per-token loss ``[B, T]`` (float32) from hidden states ``[B, T, H]``; a
    prediction that is not finite (an overflowing hidden state) is 0."""
    w = layout.weights(state)
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    # One cuBLAS product with a [H, 1] weight; float32 also under the step's autocast.
    with torch.autocast(hidden.device.type, enabled=False):
        pred = torch.addmm(w[-1:], flat, w[:-1, None]).view(hidden.shape[:-1])
    return torch.where(torch.isfinite(pred), pred, torch.zeros_like(pred))


def ready(layout: ExitLayout, state: Tensor, min_fits: int) -> Tensor:
    """Whether the exit ranks (a bool device scalar): ``min_fits`` fits, over at least ``H + 1``
    tokens of weight, and one solve that succeeded."""
    fits = layout.scalar(state, "fits")
    enough = layout.scalar(state, "weight_sum") >= float(layout.dim)
    return (fits >= float(min_fits)) & enough & (layout.scalar(state, "solved") > 0)


def _ranks(values: Tensor, keep: Tensor) -> Tensor:
    """0-based ranks of ``values`` among the ``keep`` entries (the others rank last); ties by index."""
    key = torch.where(keep, values, torch.full_like(values, float("inf")))
    order = torch.sort(key, stable=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=values.device)).float()


def _pearson(a: Tensor, b: Tensor, keep: Tensor) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` over the ``keep`` entries (0 when undefined)."""
    w = keep.float()
    n = w.sum().clamp(min=1.0)
    da = (a - (a * w).sum() / n) * w
    db = (b - (b * w).sum() / n) * w
    den = torch.sqrt((da * da).sum() * (db * db).sum())
    return torch.where(den > 0, (da * db).sum() / den.clamp(min=1e-30), torch.zeros_like(den))


def agreement(predicted: Tensor, loss: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """How well ``predicted`` ``[R, T]`` knew ``loss`` before the fit saw it (out of sample).

    Returns ``(rank, r2, rank_defined, r2_defined)``: the Spearman correlation between the
    predicted and the true row losses (weighted means over each row's positions), over rows with
    weight (defined from 3 such rows); the weighted R^2 of the per-token prediction (defined when
    the losses spread)."""
    w = weight.float()
    row_w = w.sum(-1)
    has = row_w > 0
    true_row = (loss * w).sum(-1) / row_w.clamp(min=1e-12)
    pred_row = (predicted * w).sum(-1) / row_w.clamp(min=1e-12)
    rank = _pearson(_ranks(pred_row, has), _ranks(true_row, has), has)
    total = w.sum().clamp(min=1e-12)
    mean = (loss * w).sum() / total
    ss_tot = ((loss - mean) ** 2 * w).sum()
    ss_res = ((loss - predicted) ** 2 * w).sum()
    r2 = 1.0 - ss_res / ss_tot.clamp(min=1e-12)
    return rank, r2, has.sum() >= 3, ss_tot > 0


def _solve(gram: Tensor, moment: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Ridge weights from the statistics, and whether the solve succeeded (bool device scalar)."""
    d = gram.shape[0]
    scale = torch.rsqrt(torch.diagonal(gram).clamp(min=1e-12))
    a = gram * scale[:, None] * scale[None, :] + ridge * torch.eye(d, dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(a)  # no error check: a failure is data (info), not a sync
    v = torch.cholesky_solve((moment * scale)[:, None], chol)[:, 0]
    w = v * scale
    ok = (info == 0) & torch.isfinite(w).all()
    return torch.where(ok, w, torch.zeros_like(w)), ok


def fit(
    layout: ExitLayout, state: Tensor, inputs: FitInputs, token_loss: Tensor, decay: float, ridge: float,
    min_fits: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One online fit: the successor of ``state`` after the trained positions' losses ``token_loss``
    (``[R, T]``, the main pass's, detached), and the exit's metrics for this step.

    Metrics (device scalars): ``exit_ready`` (1.0 when the selection used the exit, 0.0 while it
    was uniform), ``exit_fits``, ``exit_rank_agreement`` and ``exit_r2`` (running, bias-corrected
    means of :func:`agreement` over the fits made while ready; NaN until one was measured).
    Float32 throughout, also under the step's autocast (bf16 statistics would swamp the fit)."""
    with torch.no_grad(), torch.autocast(state.device.type, enabled=False):
        was_ready = ready(layout, state, min_fits)
        # A corrupted state (not finite) starts cold rather than poison every later step.
        state = torch.where(torch.isfinite(state).all(), state, torch.zeros_like(state))
        x = inputs.hidden.float().reshape(-1, layout.hidden)
        y = token_loss.detach().float().reshape(-1)
        w = inputs.weight.float().reshape(-1)
        ok = (w > 0) & torch.isfinite(w) & torch.isfinite(y) & torch.isfinite(x).all(-1)
        w = torch.where(ok, w, torch.zeros_like(w))
        x = torch.where(ok[:, None], x, torch.zeros_like(x))
        y = torch.where(ok, y, torch.zeros_like(y))
        xw = x * w[:, None]
        wsum = w.sum()
        # The batch's statistics of [x, 1]: blocks, so the N x (H + 1) features are never built.
        col = xw.sum(0)
        g_batch = torch.cat([
            torch.cat([xw.t() @ x, col[:, None]], dim=1),
            torch.cat([col, wsum[None]])[None, :],
        ], dim=0)
        m_batch = torch.cat([xw.t() @ y, (w * y).sum()[None]])

        gram = decay * layout.gram(state) + g_batch
        moment = decay * layout.moment(state) + m_batch
        weight_sum = decay * layout.scalar(state, "weight_sum") + wsum
        new_w, solved = _solve(gram, moment, ridge)
        old_w = layout.weights(state)
        weights = torch.where(solved, new_w, old_w)
        # A failed solve drops the history (keeping the weights): the next fit starts from this batch.
        gram = torch.where(solved, gram, g_batch)
        moment = torch.where(solved, moment, m_batch)
        weight_sum = torch.where(solved, weight_sum, wsum)

        rank, r2, rank_defined, r2_defined = agreement(
            inputs.predicted.float(), y.view_as(inputs.predicted), w.view_as(inputs.predicted))
        count_rank, count_r2 = was_ready & rank_defined, was_ready & r2_defined
        a = AGREEMENT_DECAY
        s = {n: layout.scalar(state, n) for n in _SCALARS}
        scalars = {
            "fits": s["fits"] + (wsum > 0).float(),
            "weight_sum": weight_sum,
            "solved": torch.maximum(s["solved"], solved.float()),
            "rank_num": torch.where(count_rank, a * s["rank_num"] + rank, s["rank_num"]),
            "rank_den": torch.where(count_rank, a * s["rank_den"] + 1.0, s["rank_den"]),
            "r2_num": torch.where(count_r2, a * s["r2_num"] + r2, s["r2_num"]),
            "r2_den": torch.where(count_r2, a * s["r2_den"] + 1.0, s["r2_den"]),
            "failed_solves": s["failed_solves"] + (~solved).float(),
        }
        new_state = layout.pack(gram, moment, weights, scalars)
        return new_state, metrics_of(layout, new_state, was_ready)


def metrics_of(layout: ExitLayout, state: Tensor, was_ready: Tensor) -> dict[str, Tensor]:
    """The exit's metrics from a state (``exit_ready``: ``was_ready``, whether this step's selection
    used the exit)."""
    rank_den = layout.scalar(state, "rank_den")
    r2_den = layout.scalar(state, "r2_den")
    nan = torch.full_like(rank_den, float("nan"))  # not measured yet, which is not 0 agreement
    return {
        "exit_ready": was_ready.float(),
        "exit_fits": layout.scalar(state, "fits"),
        "exit_rank_agreement": torch.where(rank_den > 0, layout.scalar(state, "rank_num") / rank_den.clamp(min=1e-12), nan),
        "exit_r2": torch.where(r2_den > 0, layout.scalar(state, "r2_num") / r2_den.clamp(min=1e-12), nan),
    }


EXIT_METRIC_KEYS = ("exit_ready", "exit_fits", "exit_rank_agreement", "exit_r2")


@torch.library.custom_op("cggr::exit_fit", mutates_args=())
def _exit_fit_op(state: Tensor, hidden: Tensor, predicted: Tensor, weight: Tensor, token_loss: Tensor,
                 hidden_size: int, decay: float, ridge: float, min_fits: int) -> tuple[Tensor, Tensor]:
    """:func:`fit` as one opaque op: ``(next state, the EXIT_METRIC_KEYS metrics stacked)``.

    Opaque so that the fit is one node of the step's graph (``explain`` shows it) and runs the same
    float32 kernels and Cholesky on every entry point, whatever Inductor fuses around it; under CUDA
    graphs they are captured whole."""
    new_state, metrics = fit(ExitLayout(hidden_size), state, FitInputs(hidden, predicted, weight), token_loss,
                             decay, ridge, min_fits)
    return new_state, torch.stack([metrics[k] for k in EXIT_METRIC_KEYS])


@_exit_fit_op.register_fake
def _exit_fit_fake(state, hidden, predicted, weight, token_loss, hidden_size, decay, ridge, min_fits):
    return torch.empty_like(state), state.new_empty(len(EXIT_METRIC_KEYS))


def hidden_size(router: object, model: torch.nn.Module) -> int:
    """The width of the router's hidden state: its head's input features, else the model config's."""
    head = getattr(router, "linear_head", None)
    if head is not None:
        return int(head.weight.shape[1])
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    head = getattr(router, "head", None)
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[1])
    raise ValueError(
        f"scoring='predicted': cannot tell the width of {type(model).__name__}'s hidden state (no linear head, "
        "no config.hidden_size); use another scoring or give the model a config with hidden_size."
    )


class LearnedExit:
    """One model's exit: its layout, its hyperparameters and its state (a device tensor, made at
    the first step on the batch's device). Not an ``nn.Module``: its state is no parameter."""

    def __init__(self, hidden: int, decay: float, ridge: float, min_fits: int) -> None:
        self.layout = ExitLayout(hidden)
        self.decay, self.ridge, self.min_fits = float(decay), float(ridge), int(min_fits)
        self.state: Optional[Tensor] = None

    @torch.compiler.disable
    def state_on(self, device: torch.device) -> Tensor:
        """The state on ``device`` (a cold one the first time; moved once if the model moved). Never
        traced: a state made inside a CUDA-graphed region would live in memory its next replay reuses."""
        if self.state is None:
            self.state = self.layout.new_state(device)
        elif self.state.device != device:
            self.state = self.state.to(device)
        return self.state

    def predict(self, state: Tensor, hidden: Tensor) -> Tensor:
        return predict(self.layout, state, hidden)

    def ready(self, state: Tensor) -> Tensor:
        return ready(self.layout, state, self.min_fits)

    def fit(self, state: Tensor, inputs: FitInputs, token_loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`fit` as the opaque op ``cggr::exit_fit`` (one node in a traced step)."""
        new_state, metrics = torch.ops.cggr.exit_fit(
            state, inputs.hidden, inputs.predicted, inputs.weight, token_loss.detach(), self.layout.hidden,
            self.decay, self.ridge, self.min_fits)
        return new_state, dict(zip(EXIT_METRIC_KEYS, metrics.unbind(0)))

    def commit(self, new_state: Tensor) -> None:
        """Keep a step's successor state (outside any graph: one device copy, no sync). Copied, not
        kept: under CUDA graphs the step's outputs live in memory the next replay overwrites."""
        if self.state is None or self.state.shape != new_state.shape or self.state.device != new_state.device:
            self.state = new_state.detach().clone()
        else:
            self.state.copy_(new_state.detach())

    def state_dict(self) -> dict[str, object]:
        return {"hidden": self.layout.hidden, "state": None if self.state is None else self.state.detach().cpu().clone()}

    def load_state_dict(self, saved: dict[str, object]) -> None:
        hidden, state = saved.get("hidden"), saved.get("state")
        if hidden != self.layout.hidden:
            raise ValueError(
                f"cggr: the saved exit state is for hidden size {hidden}, this model's router has "
                f"{self.layout.hidden}; load the state of a run of the same model (or start without it: the exit "
                "refits within exit_min_fits steps)."
            )
        if state is not None and (not isinstance(state, Tensor) or state.shape != (self.layout.size,)):
            raise ValueError(f"cggr: the saved exit state must be a tensor of {self.layout.size} values.")
        device = self.state.device if self.state is not None else "cpu"
        self.state = None if state is None else state.detach().float().to(device).clone()


def learned_exit(model: torch.nn.Module, router: object, config: CGGRConfig) -> Optional[LearnedExit]:
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
