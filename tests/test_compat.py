"""The original library's classes on the shared core."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import cggr_compile
from cggr_compile import CGGRLoss, CGGRModel, CGGRScorer, create_truncated_router
from models import batch, tiny_model


def test_cggr_loss_keeps_the_hardest_tokens_and_divides_by_them():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[1, 4:] = -100
    crit = CGGRLoss(scoring="loss", min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    loss = crit(logits, targets)
    valid = targets != -100
    nll = F.cross_entropy(logits.detach().reshape(-1, 11).double(), targets.clamp(min=0).reshape(-1),
                          reduction="none").view(3, 7)
    n = int(valid.sum())
    k = math.ceil(0.25 * n)
    hardest = torch.where(valid, nll, torch.full_like(nll, -math.inf)).flatten().topk(k).indices
    ref = nll.flatten()[hardest].mean()
    torch.testing.assert_close(loss.double(), ref)
    m = crit.get_metrics()
    assert int(m["tokens_selected"]) == k and int(m["tokens_total"]) == n and m["scoring"] == "loss"
    loss.backward()
    assert (logits.grad.reshape(-1, 11).abs().sum(-1) > 0).sum() == k


def test_cggr_loss_curriculum_advances_with_step():
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=4, dynamic_threshold=False)
    logits, targets = torch.randn(2, 8, 5), torch.randint(0, 5, (2, 8))
    ratios = []
    for _ in range(6):
        crit(logits, targets)
        ratios.append(crit.get_metrics()["token_ratio"])
        crit.step()
    assert ratios[0] == 1.0 and ratios[-1] == 0.25 and ratios == sorted(ratios, reverse=True)


def test_cggr_scorer_returns_difficulty_boolean_mask_and_info():
    model = tiny_model("llama")
    b = batch("llama")
    scorer = CGGRScorer(create_truncated_router(model, num_layers=1), min_tokens_ratio=0.5)
    difficulty, mask, info = scorer(b["input_ids"], b["attention_mask"])
    assert difficulty.shape == mask.shape == b["input_ids"].shape and mask.dtype == torch.bool
    n = int(info["tokens_total"])
    assert int(mask.sum()) == math.ceil(0.5 * n) and not (mask & (b["attention_mask"] == 0)).any()
    assert {"avg_confidence", "avg_entropy", "tokens_selected", "step"} <= set(info)


def test_create_truncated_router_shares_weights_and_matches_transform():
    model = tiny_model("llama")
    b = batch("llama")
    router = create_truncated_router(model, num_layers=2)
    assert {id(p) for p in router.base.parameters()} <= {id(p) for p in model.parameters()}
    via_transform = cggr_compile.transform(model, router_layers=2).router(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(router(b["input_ids"], b["attention_mask"]), via_transform, rtol=0, atol=0)


def test_cggr_model_takes_the_original_constructor_arguments():
    model = tiny_model("llama")
    b = batch("llama")
    cm = CGGRModel(model, router=create_truncated_router(model, num_layers=1), min_tokens_ratio=0.25,
                   warmup_steps=0, dynamic_threshold=False)
    loss = cm(b["input_ids"], labels=b["labels"])
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0  # the original returns the loss itself
    assert int(cm.get_metrics()["k"]) == 2
    loss.backward()


# The original library's documented usage (its README and docs), verbatim but for the import line;
# ``model``, ``input_ids``, ``labels`` / ``targets``, ``dataloader`` and ``optimizer`` are given.
ORIGINAL_README_MODEL = """
from cggr_compile import CGGRModel, create_truncated_router
# Create lightweight router (shares weights, 0 extra memory)
router = create_truncated_router(model, num_layers=4)
# Wrap model
cggr_model = CGGRModel(
    model,
    router=router,
    min_tokens_ratio=0.25
)
# Train
loss = cggr_model(input_ids, labels=labels)
loss.backward()
"""

ORIGINAL_README_LOSS = """
from cggr_compile import CGGRLoss
criterion = CGGRLoss(
    scoring='combined', # 'entropy', 'margin', 'loss', 'combined'
    selection='stratified', # 'topk', 'stratified', 'sequence_aware'
    min_tokens_ratio=0.25,
    warmup_steps=1000,
)
for batch in dataloader:
    logits = model(input_ids)
    loss = criterion(logits, targets) # Only hard tokens
    loss.backward()
    optimizer.step()
    criterion.step()
"""

ORIGINAL_DOCS_BASE_LOSS = """
from cggr_compile import CGGRLoss
import torch.nn as nn
criterion = CGGRLoss(
    scoring='combined',
    selection='topk',
    dynamic_threshold=True,
    threshold_sensitivity=0.5,
    min_tokens_ratio=0.25,
    warmup_steps=1000,
    num_strata=4,
    min_tokens_per_sequence=1,
    base_loss=nn.CrossEntropyLoss(reduction='none'),
)
for batch in dataloader:
    logits = model(input_ids)  # (batch, seq, vocab)
    targets = batch['labels']   # (batch, seq)
    loss = criterion(logits, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    criterion.step()  # Important: advance curriculum
metrics = criterion.get_metrics()
"""

ORIGINAL_README_SCORER = """
from cggr_compile import CGGRScorer
# 1. Initialize Scorer
scorer = CGGRScorer(router, min_tokens_ratio=0.5)
# 2. Get Mask
difficulty, mask, info = scorer(input_ids)
difficulty, mask, info = scorer(input_ids, targets=labels)
"""


class _LogitsModel(torch.nn.Module):
    """``logits = model(input_ids)``: the original's examples assume a model that returns logits."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.emb(input_ids)))


def test_original_readme_cggr_model_snippet_runs_unchanged():
    model = tiny_model("llama", layers=6)
    b = batch("llama")
    env = dict(model=model, input_ids=b["input_ids"], labels=b["labels"])
    exec(ORIGINAL_README_MODEL, env)
    assert env["loss"].dim() == 0 and model.lm_head.weight.grad is not None
    assert int(env["cggr_model"].get_metrics()["k"]) == 6  # warmup (the original's 1000 steps): all rows


def test_original_loss_snippets_run_unchanged():
    model = _LogitsModel()
    b = batch("llama")
    for snippet in (ORIGINAL_README_LOSS, ORIGINAL_DOCS_BASE_LOSS):
        env = dict(model=model, input_ids=b["input_ids"], targets=b["labels"], dataloader=[b, b],
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        exec(snippet, env)
        assert env["loss"].dim() == 0 and env["criterion"].schedule.step == 2


def test_original_scorer_snippet_runs_unchanged():
    model = tiny_model("llama")
    b = batch("llama")
    env = dict(router=create_truncated_router(model, num_layers=1), input_ids=b["input_ids"], labels=b["labels"])
    exec(ORIGINAL_README_SCORER, env)
    assert env["mask"].dtype == torch.bool and env["info"]["scoring"] == "entropy"


def test_cggr_loss_base_loss_with_mean_reduction_still_selects():
    """``base_loss=nn.CrossEntropyLoss()`` (mean) used to return the full batch's mean, unselected."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    targets = torch.randint(0, 11, (3, 7), generator=g)
    opts = dict(scoring="loss", min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    plain = CGGRLoss(**opts)(logits, targets)
    for base in (torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(reduction="none")):
        torch.testing.assert_close(CGGRLoss(base_loss=base, **opts)(logits, targets), plain)
    full_mean = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    assert not torch.allclose(plain, full_mean)


def test_cggr_loss_base_loss_that_is_not_per_token_is_named():
    class Scalar(torch.nn.Module):
        def forward(self, logits, targets):
            return F.cross_entropy(logits, targets)

    with pytest.raises(ValueError, match="must return one loss per token"):
        CGGRLoss(base_loss=Scalar())(torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)))
