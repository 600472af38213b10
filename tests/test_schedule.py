"""Warmup curriculum, lagged dynamic threshold and quantised k levels (SPEC.md, Schedule)."""

from __future__ import annotations

import logging

import pytest
import torch

import cggr_compile
from cggr_compile.config import CGGRConfig
from cggr_compile.schedule import (
    LaggedScalar, Schedule, dynamic_ratio, quantise_ratio, ratio_levels, rows_for_ratio, warmup_ratio,
)
from models import batch, tiny_model


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
    s = Schedule(CGGRConfig(min_tokens_ratio=0.25, warmup_steps=0, threshold_sensitivity=1.0, num_levels=4,
                            dynamic_threshold=True, scoring="loss"))
    assert s.ratio() == 0.25  # no confidence yet
    s.confidence.push(torch.tensor(0.2))
    assert s.ratio() == quantise_ratio(0.25 * 1.8, s.levels)
    default = Schedule(CGGRConfig(min_tokens_ratio=0.25, warmup_steps=0))
    default.confidence.push(torch.tensor(0.2))
    assert default.ratio() == 0.25  # the default keeps min_tokens_ratio
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


def _loop(cg_or_model, step_fn, steps=3, accumulate=1, optimizers=None, after=None):
    """``steps`` optimizer steps of ``accumulate`` micro-batches each, a training loop as users write it."""
    params = list(cg_or_model.parameters())
    optimizers = optimizers(params) if optimizers else [torch.optim.SGD(params, lr=1e-3)]
    for s in range(steps):
        for m in range(accumulate):
            step_fn(**batch("llama", b=8, seed=s * accumulate + m)).loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        if after is not None:
            after()


OPTS = dict(router_layers=1, warmup_steps=2, min_tokens_ratio=0.25, num_levels=4, scoring="loss", selection="topk",
            strict=True)


@pytest.mark.parametrize("how", ["nothing", "step_after", "step_before", "attach", "two_optimizers",
                                 "accumulate"])
def test_the_schedule_advances_once_per_optimizer_step_by_itself(how):
    """Forgetting cg.step() no longer keeps k = B; calling it too (before or after the optimizer's
    step, or attach_optimizer), two optimizers for one model or gradient accumulation count each
    optimizer step once."""
    cg = cggr_compile.transform(tiny_model("llama"), **OPTS)
    fn, kw = cg, {}
    if how == "step_after":
        kw["after"] = cg.step
    elif how == "step_before":
        def fn(**b):
            out = cg(**b)
            cg.step()
            return out
    elif how == "attach":
        kw["optimizers"] = lambda ps: [torch.optim.SGD(ps, lr=1e-3)]
        made = kw["optimizers"]
        kw["optimizers"] = lambda ps: [opt for opt in made(ps) if cg.attach_optimizer(opt) is not None]
    elif how == "two_optimizers":
        kw["optimizers"] = lambda ps: [torch.optim.SGD(ps[: len(ps) // 2], lr=1e-3),
                                       torch.optim.AdamW(ps[len(ps) // 2:], lr=1e-3)]
    elif how == "accumulate":
        kw["accumulate"] = 2
    _loop(cg, fn, **kw)
    assert cg.schedule.step == 3
    assert cggr_compile.last_metrics(cg)["k"] == 2  # sliced: the third step is past the warmup


@pytest.mark.parametrize("explicit", [False, True])
def test_the_backend_schedule_advances_by_itself(explicit):
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="cggr", options=OPTS)
    _loop(model, compiled, after=(lambda: cggr_compile.step(compiled)) if explicit else None)
    assert cggr_compile.backend.core_of(model).schedule.step == 3
    assert cggr_compile.last_metrics(model)["k"] == 2


def test_an_optimizer_of_another_model_does_not_advance_the_schedule():
    cg = cggr_compile.transform(tiny_model("llama"), **OPTS)
    other = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    for _ in range(3):
        cg(**batch("llama", b=8)).loss.backward()
        other(torch.ones(2)).sum().backward()
        opt.step()
    assert cg.schedule.step == 0


def test_the_end_of_the_warmup_says_what_the_dynamic_threshold_did(caplog):
    cg = cggr_compile.transform(tiny_model("llama"), **dict(OPTS, dynamic_threshold=True, threshold_sensitivity=1.0))
    with caplog.at_level(logging.INFO, logger="cggr_compile"):
        _loop(cg, cg, steps=4)
    lines = [r.message for r in caplog.records if r.name == "cggr_compile" and "warmup over" in r.message]
    assert len(lines) == 1
    assert lines[0].startswith("cggr schedule: warmup over at step 2: k = ") and "alone gives 2" in lines[0]
    assert "the dynamic threshold adds" in lines[0] and "mean confidence is 0." in lines[0]
    assert cggr_compile.last_metrics(cg)["k"] > 2  # a fresh model's low confidence holds k above 2


def test_defaults_keep_min_tokens_ratio_and_the_original_classes_keep_the_threshold():
    assert CGGRConfig().dynamic_threshold is False
    assert cggr_compile.CGGRModel(tiny_model("llama"), router_layers=1).cggr_config.dynamic_threshold is True
    assert cggr_compile.CGGRLoss().config.dynamic_threshold is True


def test_a_watched_schedule_pickles_and_its_copy_does_not_watch():
    import pickle

    cg = cggr_compile.transform(tiny_model("llama"), **OPTS)
    copy_ = pickle.loads(pickle.dumps(cg.schedule))  # weak references do not pickle: they are dropped
    assert cg.schedule.auto and not copy_.auto and copy_.step == cg.schedule.step
