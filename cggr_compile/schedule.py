"""Warmup curriculum, lagged dynamic threshold and the quantised levels of ``k``.

All of this runs on the host between steps and never waits on the device:

* ``ratio(step) = 1 - min(1, step / warmup_steps) * (1 - min_ratio)``;
* with the dynamic threshold, ``ratio' = clamp(ratio * (1 + (1 - c) * sensitivity), ratio, 1)``
  where ``c`` is the mean top-1 probability of the *latest finished* step: each step copies its
  value to pinned host memory without blocking, and a later step reads it once the copy is done;
* the ratio is then rounded **up** to the nearest of ``num_levels`` levels spaced evenly from
  ``min_ratio`` to 1 (both included), and ``k = clamp(ceil(level * B), 1, B)``. Rounding up never
  trains on fewer rows than asked; at most ``num_levels`` distinct ``k`` (so compilations) occur
  over a whole schedule, whatever the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .config import CGGRConfig

logger = logging.getLogger("cggr_compile")


def warmup_ratio(step: int, warmup_steps: int, min_ratio: float) -> float:
    """The curriculum's ratio at ``step`` (SPEC.md, Schedule)."""
    if warmup_steps <= 0:
        return float(min_ratio)
    return 1.0 - min(1.0, step / warmup_steps) * (1.0 - float(min_ratio))


def dynamic_ratio(ratio: float, mean_confidence: float, sensitivity: float) -> float:
    """Raise ``ratio`` when the router is unsure; clamped to ``[ratio, 1]``."""
    return min(1.0, max(ratio, ratio * (1.0 + (1.0 - mean_confidence) * sensitivity)))


def ratio_levels(min_ratio: float, num_levels: int) -> list[float]:
    """The allowed ratios, ascending: ``num_levels`` values evenly spaced from min_ratio to 1."""
    if num_levels == 1 or min_ratio >= 1.0:
        return [1.0] if min_ratio >= 1.0 else [float(min_ratio)]
    step = (1.0 - min_ratio) / (num_levels - 1)
    return [min_ratio + i * step for i in range(num_levels - 1)] + [1.0]


def quantise_ratio(ratio: float, levels: list[float]) -> float:
    """The smallest level >= ratio (with a little slack for float rounding)."""
    for level in levels:
        if level >= ratio - 1e-9:
            return level
    return levels[-1]


def rows_for_ratio(ratio: float, batch: int) -> int:
    """``k = clamp(ceil(ratio * B), 1, B)``."""
    return max(1, min(batch, math.ceil(ratio * batch - 1e-9)))


@dataclass(frozen=True)
class RoutedPlan:
    """Everything one routed step takes from the schedule, decided on the host before it runs.

    The routed step (``CGGRModel.routed_step``) is a function of this object and the batch, and
    never reads the schedule's mutable state, so a plan cannot go stale between the decision and
    the step. Equality (and the hash) covers exactly what a traced step bakes in, so the backend
    keys its graph cache by the plan: ``k`` rows, the token budget's ratio (tokens only), the
    granularity and where the scorer fuses. ``ratio`` (sequences: only a metric, ``k`` carries
    it) and the device step counter (the same tensor every step, a graph input) are not compared.
    """

    batch: int
    k: int
    token_ratio: Optional[float]  # tokens: the ratio that sets the token budget; sequences: None
    ratio: float = field(compare=False)
    granularity: str = "sequences"
    # Whether ``CGGRModel.route`` calls the fused scorer op itself (cfg.fused_scorer and a linear
    # head). The backend traces with it off and lets passes/fuse_scorer.py put the op in the graph.
    fuse_scorer: bool = True
    step_tensor: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    # scoring='predicted': the learned exit's state (cggr_compile.exit) as the step starts; like the
    # step counter a device tensor the step reads (a graph input), not part of the key.
    exit_state: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def replace(self, **changes: Any) -> "RoutedPlan":
        """A copy with ``changes`` (the plan itself never changes)."""
        return dataclasses.replace(self, **changes)


class LaggedScalar:
    """A device scalar read on the host one or more steps later, without a synchronisation.

    ``push`` starts a non-blocking copy to pinned memory and records an event; ``latest`` returns
    the newest value whose copy has finished (``event.query()`` never blocks), else the previous
    one. On the CPU the value is available at once.
    """

    def __init__(self) -> None:
        self._value: Optional[float] = None
        self._pending: list[tuple[torch.Tensor, Optional[torch.cuda.Event]]] = []

    def push(self, value: torch.Tensor) -> None:
        value = value.detach()
        if value.device.type == "cuda":
            host = torch.empty((), dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))
            del self._pending[:-4]  # keep a few in flight; older ones are superseded
        else:
            self._pending = [(value.to("cpu"), None)]

    def latest(self) -> Optional[float]:
        while self._pending:
            host, event = self._pending[0]
            if event is not None and not event.query():
                break
            self._value = float(host)
            self._pending.pop(0)
        return self._value


# Schedules that advance by themselves after an optimizer step that updates their model.
_WATCHED: "weakref.WeakSet[Schedule]" = weakref.WeakSet()
_hook_handle: Any = None


@torch.compiler.disable
def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The global post-step hook: every watched schedule whose model this optimizer updates
    counts the step (once per training step, see :meth:`Schedule.optimizer_stepped`)."""
    for schedule in list(_WATCHED):
        schedule.optimizer_stepped(optimizer)


class Schedule:
    """The step counter and the host-side choice of the ratio level for the next step.

    The counter advances once per optimizer step. :meth:`watch` makes that automatic: a global
    post-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) finds, the first
    time each optimizer steps, whether it holds any of the model's parameters; if so, its steps
    advance the schedule. Between two training steps (two calls of :meth:`planned`) the schedule
    advances at most once that way, however many optimizers step (one per parameter group, say),
    and an explicit :meth:`user_step` in the same interval counts the same step, not another:
    the interval advances by ``max(1 if an optimizer stepped, explicit steps)``. Gradient
    accumulation plans several micro-batches per optimizer step and still advances once.
    """

    def __init__(self, config: CGGRConfig) -> None:
        self.config = config
        self.step = 0
        self.levels = ratio_levels(config.min_tokens_ratio, config.num_levels)
        self.confidence = LaggedScalar()
        self._device_step: Optional[torch.Tensor] = None
        self.auto = False  # advance after the optimizer steps (watch() turns it on)
        self._model: Optional[weakref.ref] = None
        self._holds: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, bool]]" = weakref.WeakKeyDictionary()
        self._planned = False  # a training step ran since the last optimizer step's advance
        self._auto_counted = False  # this interval's optimizer step advanced the schedule
        self._user_steps = 0  # explicit steps in this interval
        self._described = False  # log_once: the schedule was described
        self._warmup_noted = False  # log_once: the end of the warmup was noted

    def watch(self, model: torch.nn.Module) -> None:
        """Advance after each optimizer step that updates ``model``'s parameters."""
        global _hook_handle
        self._model = weakref.ref(model)
        self.auto = True
        _WATCHED.add(self)
        if _hook_handle is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)

    def __getstate__(self) -> dict:
        # A copy or a pickle does not watch: weak references do not pickle, and the copy's model
        # is another object (watch() it again to advance it by itself).
        state = dict(self.__dict__)
        state.update(auto=False, _model=None, _holds=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._holds = weakref.WeakKeyDictionary()

    def log_once(self, batch: int) -> None:
        """Log what the schedule will do, once; and once the warmup is over (with the dynamic
        threshold), what the threshold made of ``k``. Called as each step is planned."""
        c = self.config
        if not self.__dict__.get("_described"):
            # Once: a user who keeps the defaults trains the whole batch (plus the router) for a
            # while; say so, with the k now and when slicing starts, rather than leave it silent.
            self._described = True
            slicing_later = self.rows(batch) == batch and c.min_tokens_ratio < 1
            logger.log(logging.WARNING if slicing_later else logging.INFO, self.describe(batch))
        if not self.__dict__.get("_warmup_noted") and c.uses_dynamic_threshold and self.warmup_over():
            # Once, when k has reached its final level: what the dynamic threshold made of it.
            self._warmup_noted = True
            logger.info(self.threshold_note(batch))

    def planned(self) -> None:
        """A training step (one micro-batch) is about to run: a new interval starts."""
        self._planned, self._auto_counted, self._user_steps = True, False, 0

    def user_step(self) -> None:
        """An explicit step (``cggr_compile.step``, ``attach_optimizer``, the Trainer's callback)."""
        if self._auto_counted and self._user_steps == 0:
            self._user_steps = 1  # the optimizer's hook already counted this very step
            return
        self._user_steps += 1
        self.advance()

    def optimizer_stepped(self, optimizer: torch.optim.Optimizer) -> None:
        if not (self.auto and self._planned) or self._auto_counted or self._user_steps:
            return
        if self._updates_model(optimizer):
            self._auto_counted = True
            self.advance()

    def _updates_model(self, optimizer: torch.optim.Optimizer) -> bool:
        groups = len(optimizer.param_groups)
        known = self._holds.get(optimizer)
        if known is not None and known[0] == groups:
            return known[1]
        model = self._model() if self._model is not None else None
        if model is None:
            return False
        own = {id(p) for p in model.parameters()}
        holds = any(id(p) in own for g in optimizer.param_groups for p in g["params"])
        self._holds[optimizer] = (groups, holds)
        return holds

    def advance(self) -> None:
        self.step += 1
        if self._device_step is not None:
            self._device_step.add_(1)  # in place, on the device: no host round trip

    def set_step(self, step: int) -> None:
        """Jump to ``step`` (a resumed run); the device counter is rebuilt at its next use."""
        self.step = step
        self._device_step = None

    def device_step(self, device: torch.device) -> torch.Tensor:
        """The step counter as an int64 device scalar, for the seeded draws inside graphs."""
        if self._device_step is None or self._device_step.device != device:
            self._device_step = torch.full((), self.step, dtype=torch.int64, device=device)
        return self._device_step

    def ratio(self) -> float:
        """The (quantised) ratio for the next step."""
        c = self.config
        r = warmup_ratio(self.step, c.warmup_steps, c.min_tokens_ratio)
        if c.uses_dynamic_threshold:
            conf = self.confidence.latest()
            if conf is not None:
                r = dynamic_ratio(r, conf, c.threshold_sensitivity)
        return quantise_ratio(r, self.levels)

    def rows(self, batch: int) -> int:
        return rows_for_ratio(self.ratio(), batch)

    def plan(self, batch: int, device: torch.device) -> RoutedPlan:
        """The next routed step's plan for a batch of ``batch`` rows on ``device``."""
        c = self.config
        ratio = self.ratio()
        return RoutedPlan(
            batch=batch, k=rows_for_ratio(ratio, batch),
            token_ratio=ratio if c.granularity == "tokens" else None, ratio=ratio,
            granularity=c.granularity, fuse_scorer=bool(c.fused_scorer), step_tensor=self.device_step(device),
        )

    def describe(self, batch: int) -> str:
        """One line for the user: ``k`` now, when the curriculum starts slicing and when it ends."""
        c = self.config
        k_now = rows_for_ratio(self.ratio(), batch)
        k_end = rows_for_ratio(quantise_ratio(c.min_tokens_ratio, self.levels), batch)
        start = next((s for s in range(self.step, max(self.step, c.warmup_steps) + 1)
                      if rows_for_ratio(quantise_ratio(warmup_ratio(s, c.warmup_steps, c.min_tokens_ratio),
                                                       self.levels), batch) < batch), None)
        unit = "rows" if c.granularity == "sequences" else "rows' worth of tokens"
        parts = [f"cggr schedule: step {self.step}, k = {k_now} of {batch} {unit} now"]
        if c.warmup_steps > 0:
            parts.append(f"the ratio falls from 1 to min_tokens_ratio={c.min_tokens_ratio} (k = {k_end}) over "
                         f"warmup_steps={c.warmup_steps} optimizer steps"
                         + (f", so slicing starts at step {start}" if start is not None and start > self.step else ""))
        if c.uses_dynamic_threshold:
            parts.append(f"the dynamic threshold raises k while the router is unsure (up to "
                         f"ratio * (1 + {c.threshold_sensitivity}) at zero confidence)")
        if self.auto:
            parts.append("the schedule advances by itself once per optimizer step that updates the model "
                         "(cggr_compile.step(model) in the same step counts that step, not another)")
        else:
            parts.append("the schedule advances once per optimizer step (the Trainer integration, "
                         "cggr_compile.step(model) or cg.attach_optimizer(opt))")
        return "; ".join(parts) + "."

    def warmup_over(self) -> bool:
        """Whether the curriculum has reached ``min_tokens_ratio`` and, with the dynamic threshold,
        the router's confidence is known (so :meth:`threshold_note` says what it did)."""
        c = self.config
        return self.step >= c.warmup_steps and (not c.uses_dynamic_threshold or self.confidence.latest() is not None)

    def threshold_note(self, batch: int) -> str:
        """One line once the warmup is over: ``k`` against what ``min_tokens_ratio`` alone gives."""
        c = self.config
        k_now = rows_for_ratio(self.ratio(), batch)
        k_min = rows_for_ratio(quantise_ratio(c.min_tokens_ratio, self.levels), batch)
        line = (f"cggr schedule: warmup over at step {self.step}: k = {k_now} of {batch}; "
                f"min_tokens_ratio={c.min_tokens_ratio} alone gives {k_min}")
        if c.uses_dynamic_threshold:
            conf = self.confidence.latest()
            line += (f"; the dynamic threshold adds {k_now - k_min} while the router's mean confidence is "
                     f"{conf:.2f} (it adds rows while the router is unsure; dynamic_threshold=False keeps "
                     "min_tokens_ratio exactly)")
        return line + "."
