"""The original library's classes, on top of the same core (same constructor arguments).

* :class:`CGGRLoss`: selective loss over the hardest tokens of logits the user already has.
* :class:`CGGRScorer`: ``(difficulty, mask, info)`` from a router, for models that route tokens
  themselves (mask is boolean, True = hard).
* :class:`CGGRModel`: the original's wrapper: a training call with labels returns **the loss
  tensor** (``loss = cggr_model(input_ids, labels=labels); loss.backward()``), and
  ``get_metrics()`` the last step's statistics. :func:`cggr_compile.transform` is the same core
  returning the model's usual output (``output.loss``, ``output.selected_indices``).
* :func:`create_truncated_router`: the weight-sharing router of the first ``num_layers`` layers.

Unlike the original, ``CGGRLoss`` scores position ``t`` against ``targets[:, t]`` exactly as it
computes the loss (the caller shifts both, as in the original's examples), and it divides by the
selected valid positions only.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import scoring as S
from .config import CGGRConfig
from .metrics import skip_metrics, step_metrics, token_counts
from .router import TruncatedRouter, TruncatedRouterModule, build_router
from .schedule import Schedule
from .selection import truncation_skips_of
from .transform import CGGRModel as _TransformModel, check_batch, score_positions

__all__ = ["CGGRLoss", "CGGRScorer", "CGGRModel", "create_truncated_router"]


def create_truncated_router(model: nn.Module, num_layers: int = 4) -> TruncatedRouterModule:
    """The original's router: an ``nn.Module`` running the model's first ``num_layers`` layers,
    final norm and head, sharing every tensor with the model (nothing is copied).

    ``router(input_ids, attention_mask=None, **row_inputs)`` returns the logits ``[B, T, V]``
    under no-grad, always in eval mode (no dropout; ``router.train()`` changes neither that nor the
    model's mode). ``router.parameters()`` / ``state_dict()`` are the model's own tensors that the
    router runs (embeddings, the first K layers, the final norm, the head: ``is``-identical, under
    the model's keys); the router owns none, and ``model.parameters()`` / ``state_dict()`` do not
    change. ``router.to(device)`` / ``.cuda()`` move the **whole model** (moving only the shared
    part would split it across devices); a dtype change of the shared weights (``router.half()``)
    raises ``TypeError``, since it would convert the model's trained weights. See
    :class:`~cggr_compile.router.TruncatedRouterModule`.

    ``num_layers`` must satisfy ``1 <= num_layers < `` the model's depth (``ValueError``
    otherwise); the model must have a Hugging Face layout (a base model, its layer list, a head).
    """
    try:
        router, _ = build_router(model, num_layers)
    except ValueError as err:  # build_router names its option router_layers; here it is num_layers
        raise ValueError(f"create_truncated_router: {str(err).replace('router_layers', 'num_layers')}") from err
    if not isinstance(router, TruncatedRouter):
        raise ValueError(f"create_truncated_router: {type(model).__name__} has no recognisable layer list")
    return TruncatedRouterModule(router, model)


def _token_config(arguments: dict[str, Any]) -> CGGRConfig:
    """The token-granularity config from a constructor's arguments (those that are options)."""
    fields = {f.name for f in dataclasses.fields(CGGRConfig)}
    return CGGRConfig(granularity="tokens", **{k: v for k, v in arguments.items() if k in fields})


class _Scheduled:
    """Shared by CGGRLoss and CGGRScorer: a config, a schedule and the last metrics."""

    def __init__(self, config: CGGRConfig) -> None:
        self.config = config
        self.schedule = Schedule(config)
        self._metrics: dict[str, Any] = {}

    def step(self) -> None:
        """Advance the curriculum (call after each optimizer step)."""
        self.schedule.advance()

    def get_metrics(self) -> dict[str, Any]:
        """The last call's statistics (device tensors where they come from the batch)."""
        return dict(self._metrics)

    def _select(self, r: Any) -> tuple[Tensor, float]:
        ratio = self.schedule.ratio()
        c = self.config
        skip = None
        if c.selection == "truncation":
            skip = truncation_skips_of(r.difficulty, r.valid, S.token_budget(r.valid, ratio), None, c)
        mask = S.select_tokens(r.difficulty, r.valid, ratio, c.selection, c.num_strata,
                               c.min_tokens_per_sequence, c.seed, self.schedule.device_step(r.difficulty.device),
                               skip=skip)
        if "avg_confidence" in r.metrics:
            self.schedule.confidence.push(r.metrics["avg_confidence"])
        self._metrics = step_metrics(c, self.schedule, r.metrics, ratio, **token_counts(mask, r.valid),
                                     **skip_metrics(skip, r.valid, "tokens"))
        return mask, ratio


class CGGRModel(_TransformModel):
    """The original's ``CGGRModel(model, router=..., min_tokens_ratio=...)``: a training call with
    labels returns the CGGR loss tensor; anything else (eval, ``no_grad``, no labels) returns the
    plain model's output. The options are :class:`~cggr_compile.config.CGGRConfig`'s, with the
    original's defaults (``scoring='combined'``, ``selection='topk'``, which can drift, see the
    README; ``dynamic_threshold=True``)."""

    def __init__(self, model: nn.Module, config: Optional[CGGRConfig] = None, **options: Any) -> None:
        if config is None:
            options.setdefault("scoring", "combined")
            options.setdefault("selection", "topk")
            options.setdefault("dynamic_threshold", True)
        super().__init__(model, config, **options)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, **kwargs: Any) -> Any:
        out = super().forward(input_ids, attention_mask, labels, **kwargs)
        routed = self.model.training and torch.is_grad_enabled() and labels is not None
        return out["loss"] if routed else out

    def get_metrics(self) -> dict[str, Any]:
        """The last training step's statistics (device tensors; reading them synchronises)."""
        return self.metrics()


def _per_token(base_loss: Optional[nn.Module]) -> Optional[nn.Module]:
    """``base_loss`` as a loss per token: one with ``reduction`` (``nn.CrossEntropyLoss()``, whose
    default is the mean) is copied with ``reduction='none'``, keeping its other settings."""
    if base_loss is not None and getattr(base_loss, "reduction", "none") != "none":
        base_loss = copy.copy(base_loss)
        base_loss.reduction = "none"
    return base_loss


class CGGRLoss(nn.Module, _Scheduled):
    """Cross-entropy over the hardest tokens of ``logits`` (``[B, T, V]``) against ``targets``.

    ``base_loss`` (optional, as in the original: ``nn.CrossEntropyLoss(reduction='none')``) computes
    the loss per token from ``(logits [N, V] float32, targets [N])``; a module with another
    ``reduction`` is used with ``reduction='none'``, since the selection needs one loss per token.
    """

    def __init__(
        self, scoring: str = "combined", selection: str = "topk", dynamic_threshold: bool = True,
        threshold_sensitivity: float = 0.5, min_tokens_ratio: float = 0.25, warmup_steps: int = 1000,
        num_strata: int = 4, min_tokens_per_sequence: int = 1, base_loss: Optional[nn.Module] = None,
    ) -> None:
        nn.Module.__init__(self)
        _Scheduled.__init__(self, _token_config(locals()))
        self.base_loss = _per_token(base_loss)

    def forward(self, logits: Tensor, targets: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if logits.dim() != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"CGGRLoss: logits must be [batch, seq, vocab] and targets [batch, seq]; got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        r = score_positions(logits.detach(), attention_mask, targets, causal=False, scoring=self.config.scoring)
        mask, _ = self._select(r)
        if self.base_loss is None:
            return S.selective_cross_entropy(logits, targets, mask)
        per_token = self.base_loss(logits.reshape(-1, logits.shape[-1]).float(), targets.clamp(min=0).reshape(-1))
        if per_token.numel() != targets.numel():
            raise ValueError(
                f"CGGRLoss: base_loss returned {tuple(per_token.shape)} for {targets.numel()} tokens; it must "
                "return one loss per token (e.g. nn.CrossEntropyLoss(reduction='none')) for the selection "
                "to pick tokens."
            )
        w = mask.reshape(-1).to(per_token.dtype)
        return (per_token * w).sum() / w.sum().clamp(min=1.0)


class CGGRScorer(nn.Module, _Scheduled):
    """``(difficulty [B, T], mask [B, T] bool, info)`` from a router, without touching the batch."""

    def __init__(
        self, router: Callable[..., Tensor], min_tokens_ratio: float = 0.5, scoring: str = "entropy",
        selection: str = "topk", dynamic_threshold: bool = False, threshold_sensitivity: float = 0.5,
        warmup_steps: int = 0, num_strata: int = 4, min_tokens_per_sequence: int = 1, causal: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        _Scheduled.__init__(self, _token_config(locals()))
        self.__dict__["router"] = router  # not a submodule: it shares the model's weights
        self.causal = causal

    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
        targets: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """``targets=`` is the original's name for ``labels`` (either, not both)."""
        if targets is not None:
            if labels is not None:
                raise ValueError("CGGRScorer: pass labels= or targets= (the original's name), not both")
            labels = targets
        check_batch(input_ids, labels, attention_mask)
        with torch.no_grad():
            out = self.router(input_ids, attention_mask)
            r = score_positions(out, attention_mask, labels, self.causal, self.config.scoring)
            mask, _ = self._select(r)
        return r.difficulty, mask, self.get_metrics()
