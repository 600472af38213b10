"""The original library's classes on the shared core."""

from __future__ import annotations

import math

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
    out = cm(b["input_ids"], labels=b["labels"])
    assert out.selected_indices.numel() == 2
    out.loss.backward()
