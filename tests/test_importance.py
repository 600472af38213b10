"""selection='importance': rows drawn with probability rising with their score, each drawn row's loss
weighted by 1/(k p); the loss and the gradient are unbiased estimates of the full batch's."""

from __future__ import annotations

import pytest
import torch

import cggr_compile
from cggr_compile import scoring as S
from cggr_compile.backend import last_metrics
from models import batch, tiny_model

OPTS = dict(strict=True, router_layers=1, warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.5, scoring="loss",
            selection="importance", importance_floor=0.3)


def _grads(model):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


def test_loss_and_gradient_are_unbiased_for_the_full_batch():
    model = tiny_model("llama")
    b = batch("llama")
    model.zero_grad()
    full = model(**b).loss  # transformers' mean over the valid labels of the whole batch
    full.backward()
    full = full.detach()
    g_full = _grads(model)
    cg = cggr_compile.transform(model, **OPTS)
    losses, grads = [], []
    for _ in range(300):
        model.zero_grad()
        out = cg(**b)
        out.loss.backward()
        assert out["selected_indices"].shape == (3,)
        losses.append(out.loss.detach().double())
        grads.append(_grads(model).double())
        cg.step()
    losses, grads = torch.stack(losses), torch.stack(grads)
    n = len(losses)
    assert abs(float(losses.mean()) - float(full)) < 4 * float(losses.std()) / n ** 0.5
    err = (grads.mean(0) - g_full.double()).norm()
    expected = (grads.var(0).sum() / n).sqrt()  # the norm of the mean's error, if unbiased
    assert err < 2 * expected, (float(err), float(expected))
    assert float(expected) < 0.2 * float(g_full.norm())  # the test can tell a biased estimator apart
    # topk with the same router is biased: its mean loss sits well above the full batch's
    top = cggr_compile.transform(model, **{**OPTS, "selection": "topk"})
    assert float(top(**b).loss) > float(full) + 4 * float(losses.std()) / n ** 0.5


def test_metrics_and_weights_of_a_step():
    model = tiny_model("llama")
    b = batch("llama")
    cg = cggr_compile.transform(model, **OPTS)
    idx, weight, m = cg.select(**b)
    assert weight.dtype == torch.float32 and weight.shape == (3, b["input_ids"].shape[1])
    r = cg.route(b["input_ids"], b["attention_mask"], b["labels"])
    seq = S.sequence_difficulty(r.difficulty, r.valid)
    p = S.importance_probabilities(seq, r.valid.sum(-1), 0.3)
    valid_rows = r.valid[idx]
    torch.testing.assert_close(weight, valid_rows.float() / (3 * p[idx]).unsqueeze(-1))
    assert int(m["tokens_selected"]) == int(valid_rows.sum()) and int(m["tokens_total"]) == int(r.valid.sum())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_backend_equals_transform(name):
    b = batch(name)
    model = tiny_model(name)
    if name == "gpt2":
        model.loss_type = "ForCausalLM"
    cg = cggr_compile.transform(model, **OPTS)
    cg.schedule.set_step(5)
    out = cg(**b)
    out.loss.backward()
    ref_sel, ref_loss = out["selected_indices"], out.loss.detach()
    ref_grads = _grads(model)
    model.zero_grad()
    compiled = torch.compile(model, backend="cggr", options=OPTS)
    # the backend's own schedule at the same step (before its first call, cggr_compile.step(compiled)
    # has no core to advance: it raises, where it used to be a silent no-op that left this at step 0)
    cggr_compile.backend.core_for(model, OPTS).schedule.set_step(5)
    got = compiled(**b)
    got.loss.backward()
    assert torch.equal(last_metrics(model)["selected_indices"].cpu(), ref_sel)
    torch.testing.assert_close(got.loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(model), ref_grads, rtol=1e-4, atol=1e-6)


def test_trainer_integrations_refuse_importance():
    cg = cggr_compile.transform(tiny_model("llama"), **OPTS)
    with pytest.raises(ValueError, match="selection='importance' weighs each drawn row's loss"):
        cggr_compile.route_step(cg, [batch("llama")])
