"""Gradient parity per architecture: both entry points, both granularities, against a reference
that scores in float64 and selects the same rows (or tokens) by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cggr_compile
from cggr_compile.backend import last_metrics
from models import ARCHITECTURES, MASKED, batch, reference_selection, tiny_model

K = 1  # router layers
RATIO = 0.5
OPTIONS = dict(router_layers=K, min_tokens_ratio=RATIO, warmup_steps=0, dynamic_threshold=False, scoring="loss",
               strict=True, selection="topk")

FINAL_NORM = {
    "gpt2": "transformer.ln_f", "gptj": "transformer.ln_f", "falcon": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm", "opt": "model.decoder.final_layer_norm",
    "mamba": "backbone.norm_f", "bert": None, "roberta": None,
}


def reference_final_hidden(name, model, b):
    """The final-normed hidden state after K layers (the router's ``hidden``), in the model's dtype."""
    was = model.training
    model.eval()
    with torch.no_grad():
        hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
    model.train(was)
    norm_path = FINAL_NORM.get(name, "model.norm")
    norm = model.get_submodule(norm_path) if norm_path else torch.nn.Identity()
    with torch.no_grad():
        # Mamba lists no embedding output: its hidden_states[i] is the state after i+1 layers.
        return norm(hs[K - 1] if name == "mamba" else hs[K])


def reference_router_logits(name, model, b):
    """The model's own head on the final norm of the hidden state after K layers (float64)."""
    head = model.get_submodule("cls" if name == "bert" else "lm_head")
    with torch.no_grad():
        logits = head(reference_final_hidden(name, model, b)).double()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def reference_targets(name, b):
    """The targets the router scores (a causal LM's shifted labels) and where they count."""
    labels = b["labels"]
    target = labels if name in MASKED else torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = (target != -100) & (b["attention_mask"] == 1)
    return target, valid


def reference_step(model, b, selection, target, valid, granularity):
    """Loss and gradients of the plain model on the hand-selected rows/tokens."""
    model.zero_grad()
    if granularity == "sequences":
        idx = selection
        logits = model(input_ids=b["input_ids"][idx], attention_mask=b["attention_mask"][idx]).logits
        keep, tgt = valid[idx], target[idx]
    else:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        keep, tgt = selection & valid, target
    loss = F.cross_entropy(logits.float()[keep], tgt[keep], reduction="mean")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def run_transform(model, b, granularity):
    cg = cggr_compile.transform(model, granularity=granularity, **OPTIONS)
    out = cg(**b)
    out.loss.backward()
    sel = out["selected_indices"] if granularity == "sequences" else out["selected_mask"]
    return out.loss.detach(), sel, out


def run_backend(model, b, granularity):
    compiled = torch.compile(model, backend="cggr", options=dict(granularity=granularity, **OPTIONS))
    out = compiled(**b)
    out.loss.backward()
    key = "selected_indices" if granularity == "sequences" else "selected_mask"
    return out.loss.detach(), last_metrics(model)[key], out


@pytest.mark.parametrize("granularity", ["sequences", "tokens"])
@pytest.mark.parametrize("entry", ["transform", "backend"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_parity(name, entry, granularity):
    model = tiny_model(name)
    b = batch(name)
    target, valid = reference_targets(name, b)
    selection = reference_selection(reference_router_logits(name, model, b), target, valid, granularity, RATIO)
    ref_loss, ref_grads = reference_step(model, b, selection, target, valid, granularity)

    model.zero_grad()
    loss, got_selection, out = (run_transform if entry == "transform" else run_backend)(model, b, granularity)
    assert torch.equal(got_selection.cpu(), selection), (got_selection, selection)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
        else:
            assert p.grad is None or not p.grad.any(), n
    if granularity == "sequences":
        # The main pass ran on the selected rows only: its logits have k rows.
        assert out.logits.shape[0] == selection.numel()


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "mistral"])
def test_unselected_rows_send_no_gradient(name):
    """Tokens that only occur in unselected rows get no gradient in the (untied) input embedding."""
    model = tiny_model(name)
    emb = model.get_input_embeddings()
    assert emb.weight is not model.get_output_embeddings().weight, "needs untied embeddings"
    b = batch(name)
    cg = cggr_compile.transform(model, **OPTIONS)
    out = cg(**b)
    out.loss.backward()
    idx = out["selected_indices"]
    chosen = set(b["input_ids"][idx].flatten().tolist())
    only_unselected = set(b["input_ids"].flatten().tolist()) - chosen
    assert only_unselected, "the test batch must have tokens outside the selected rows"
    for tok in only_unselected:
        assert not emb.weight.grad[tok].any(), tok
    assert any(emb.weight.grad[tok].any() for tok in chosen)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_router_logits_are_head_of_final_norm_after_k_layers(name):
    model = tiny_model(name)
    b = batch(name)
    cg = cggr_compile.transform(model, router_layers=K)
    got = cg.router(b["input_ids"], b["attention_mask"]).double()
    torch.testing.assert_close(got, reference_router_logits(name, model, b), rtol=1e-5, atol=1e-5)
