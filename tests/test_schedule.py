"""Warmup curriculum, lagged dynamic threshold and quantised k levels (SPEC.md, Schedule)."""

from __future__ import annotations

import torch

from cggr_compile.config import CGGRConfig
from cggr_compile.schedule import (
    LaggedScalar, Schedule, dynamic_ratio, quantise_ratio, ratio_levels, rows_for_ratio, warmup_ratio,
)


def test_warmup_formula():
    assert warmup_ratio(0, 100, 0.25) == 1.0
    assert warmup_ratio(50, 100, 0.25) == 1 - 0.5 * 0.75
    assert warmup_ratio(100, 100, 0.25) == 0.25
    assert warmup_ratio(1000, 100, 0.25) == 0.25
    assert warmup_ratio(7, 0, 0.3) == 0.3


def test_dynamic_threshold_formula_and_clamp():
    assert abs(dynamic_ratio(0.25, 0.3, 0.5) - 0.25 * (1 + 0.7 * 0.5)) < 1e-12
    assert dynamic_ratio(0.9, 0.0, 1.0) == 1.0  # clamped to 1
    assert dynamic_ratio(0.25, 1.0, 0.5) == 0.25  # never below the curriculum


def test_levels_bound_k_and_round_up():
    levels = ratio_levels(0.25, 8)
    assert len(levels) == 8 and levels[0] == 0.25 and levels[-1] == 1.0
    assert quantise_ratio(0.25, levels) == 0.25
    assert quantise_ratio(0.26, levels) > 0.26  # up, never fewer rows than asked
    ks = {rows_for_ratio(quantise_ratio(warmup_ratio(s, 1000, 0.25), levels), 16) for s in range(1200)}
    assert len(ks) <= 8 and min(ks) == 4 and max(ks) == 16
    assert rows_for_ratio(0.25, 6) == 2 and rows_for_ratio(0.01, 6) == 1 and rows_for_ratio(1.0, 6) == 6


def test_schedule_uses_previous_confidence_without_waiting():
    s = Schedule(CGGRConfig(min_tokens_ratio=0.25, warmup_steps=0, threshold_sensitivity=1.0, num_levels=4))
    assert s.ratio() == 0.25  # no confidence yet
    s.confidence.push(torch.tensor(0.2))
    assert s.ratio() == quantise_ratio(0.25 * 1.8, s.levels)
    off = Schedule(CGGRConfig(min_tokens_ratio=0.25, warmup_steps=0, selection="fixed_quota"))
    off.confidence.push(torch.tensor(0.0))
    assert off.ratio() == 0.25  # fixed_quota: threshold off


def test_lagged_scalar_keeps_latest_finished_value():
    lag = LaggedScalar()
    assert lag.latest() is None
    lag.push(torch.tensor(0.5))
    lag.push(torch.tensor(0.75))
    assert lag.latest() == 0.75


def test_first_routed_step_says_once_what_the_schedule_will_do(caplog):
    """The defaults train the whole batch for hundreds of steps: the first step says so, once."""
    import logging
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from models import batch, tiny_model

    model = tiny_model("llama")
    compiled = torch.compile(model, backend="cggr", options=dict(router_layers=1, strict=True))
    b = batch("llama", b=8)
    with caplog.at_level(logging.INFO, logger="cggr_compile"):
        compiled(**b)
        compiled(**b)
    lines = [r for r in caplog.records if r.name == "cggr_compile"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "k = 8 of 8 rows now" in lines[0].message and "slicing starts at step 286" in lines[0].message
    assert Schedule(CGGRConfig(warmup_steps=0, dynamic_threshold=False)).describe(8).startswith(
        "cggr schedule: step 0, k = 2 of 8 rows now;")
