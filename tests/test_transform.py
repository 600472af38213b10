"""Module transform: identity outside training, no copied state, router without dropout,
metrics as tensors, zero loss on empty batches, bounded compilations over a schedule."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import cggr_compile
from models import batch, tiny_model

OPTS = dict(strict=True, router_layers=1, warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.5,
            scoring="combined", selection="topk")


@pytest.mark.parametrize("mode", ["eval", "no_grad", "no_labels"])
def test_outside_training_the_model_runs_unchanged(mode):
    model = tiny_model("llama")
    cg = cggr_compile.transform(model, **OPTS)
    b = batch("llama")
    if mode == "no_labels":
        b = {k: v for k, v in b.items() if k != "labels"}
    if mode == "eval":
        cg.eval()
    ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with ctx:
        got = cg(**b)
        ref = model(**b)
    assert got.logits.shape[0] == b["input_ids"].shape[0]
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
    if "labels" in b:
        torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=0)


def test_parameters_and_state_dict_unchanged():
    model = tiny_model("llama")
    names = list(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    cg = cggr_compile.transform(model, router_layers=2)
    assert [id(p) for p in model.parameters()] == ids
    assert [id(p) for p in cg.parameters()] == ids
    assert list(cg.state_dict()) == names and list(model.state_dict()) == names
    # the router holds the very same tensors: no copy
    router_params = {id(p) for p in cg.router.base.parameters()}
    assert router_params <= set(ids)
    cg.load_state_dict(model.state_dict())


def test_router_runs_without_dropout_and_without_grad():
    model = tiny_model("gpt2")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    cg = cggr_compile.transform(model, **OPTS)
    b = batch("gpt2")
    a = cg.router(b["input_ids"], b["attention_mask"])
    c = cg.router(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert not a.requires_grad
    assert model.training and all(m.training for m in model.modules())  # model's own mode untouched


def test_output_carries_selection_and_tensor_metrics():
    cg = cggr_compile.transform(tiny_model("llama"), **OPTS)
    out = cg(**batch("llama"))
    assert out.selected_indices.dtype == torch.int64 and out.selected_indices.numel() == 3
    m = out.cggr_metrics
    for key in ("tokens_selected", "tokens_total", "avg_confidence", "avg_entropy", "avg_difficulty"):
        assert isinstance(m[key], torch.Tensor), key
    assert (m["k"], m["token_ratio"], m["selection"], m["scoring"]) == (3, 0.5, "topk", "combined")
    assert 0 < int(m["tokens_selected"]) <= int(m["tokens_total"])
    assert cg.metrics()["k"] == 3


@pytest.mark.parametrize("granularity", ["sequences", "tokens"])
def test_batch_without_valid_positions_gives_connected_zero(granularity):
    cg = cggr_compile.transform(tiny_model("llama"), granularity=granularity, **OPTS)
    b = batch("llama")
    b["labels"] = torch.full_like(b["labels"], -100)
    out = cg(**b)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()


def test_user_router_returning_difficulties():
    model = tiny_model("llama")
    b = batch("llama")
    hard = torch.tensor([5, 0, 3])

    def router(input_ids, attention_mask=None):
        d = torch.zeros(input_ids.shape, dtype=torch.float32)
        d[hard] = 1.0
        return d

    out = cggr_compile.transform(model, router=router, **OPTS)(**b)
    assert out.selected_indices.tolist() == sorted(hard.tolist())


def test_schedule_compiles_a_bounded_number_of_times():
    model = tiny_model("llama")
    cg = cggr_compile.transform(model, router_layers=1, warmup_steps=20, min_tokens_ratio=0.25, num_levels=4)
    compiled = torch.compile(cg, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cg.attach_optimizer(opt)
    b = batch("llama", b=8)
    counters.clear()
    ks = []
    for _ in range(30):
        out = compiled(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        ks.append(out.cggr_metrics["k"])
    assert cg.schedule.step == 30
    assert ks[0] == 8 and ks[-1] < 8 and ks == sorted(ks, reverse=True)
    assert counters["stats"]["unique_graphs"] <= 4  # one graph per level used, never per step


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("scoring", ["entropy", "margin", "loss", "combined"])
def test_fused_scorer_gives_the_unfused_scores(name, scoring):
    """SPEC: every path computes the same numbers (Gemma2 covers the soft-capped head)."""
    model = tiny_model(name)
    b = batch(name)
    fused = cggr_compile.transform(model, router_layers=1, scoring=scoring)
    plain = cggr_compile.transform(model, router_layers=1, scoring=scoring, fused_scorer=False)
    assert fused.router.linear_head is not None
    rf = fused.route(b["input_ids"], b["attention_mask"], b["labels"])
    rp = plain.route(b["input_ids"], b["attention_mask"], b["labels"])
    torch.testing.assert_close(rf.difficulty, rp.difficulty, rtol=1e-5, atol=1e-5)
    for key in rp.metrics:
        torch.testing.assert_close(rf.metrics[key], rp.metrics[key], rtol=1e-5, atol=1e-5)


def test_loss_denominator_weighs_every_selected_token_the_same_across_micro_batches():
    """Two micro-batches with a shared denominator give the gradient of one batch of both selections."""
    model = tiny_model("llama")
    cg = cggr_compile.transform(model, **OPTS)
    b1, b2 = batch("llama", seed=1), batch("llama", seed=2)
    n1 = cg(**b1).cggr_metrics["tokens_selected"]
    n2 = cg(**b2).cggr_metrics["tokens_selected"]
    model.zero_grad()
    total = n1 + n2
    for b in (b1, b2):
        cg(**b, loss_denominator=total).loss.backward()
    acc = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # reference: the selected rows of both micro-batches as one batch, mean over their tokens
    i1 = cg(**b1).selected_indices
    i2 = cg(**b2).selected_indices
    model.zero_grad()
    ids = torch.cat([b1["input_ids"][i1], b2["input_ids"][i2]])
    mask = torch.cat([b1["attention_mask"][i1], b2["attention_mask"][i2]])
    labels = torch.cat([b1["labels"][i1], b2["labels"][i2]])
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    keep = (tgt != -100) & (mask == 1)
    torch.nn.functional.cross_entropy(logits[keep], tgt[keep]).backward()
    assert int(keep.sum()) == int(total)
    for n, p in model.named_parameters():
        torch.testing.assert_close(acc[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_step_and_last_metrics_work_on_every_kind_of_cggr_model():
    """cggr_compile.step / last_metrics used to be silent no-ops on a transformed model (k = B forever)."""
    model = tiny_model("llama")
    cg = cggr_compile.transform(model, **dict(OPTS, warmup_steps=4, min_tokens_ratio=0.25))
    b = batch("llama", b=8)
    for wrapped in (cg, torch.compile(cg)):
        assert wrapped(**b).loss.isfinite()
        before = cg.schedule.step
        cggr_compile.step(wrapped)
        assert cg.schedule.step == before + 1
        assert cggr_compile.last_metrics(wrapped)["k"] == cg.metrics()["k"]
    with pytest.raises(ValueError, match="is no CGGR model .*cggr_compile.transform"):
        cggr_compile.step(tiny_model("llama"))
    assert cggr_compile.last_metrics(tiny_model("llama")) == {}
