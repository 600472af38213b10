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


# -- create_truncated_router is an nn.Module over the model's own tensors ------------------------

def _shared_expected(model, k):
    """The Llama tensors the router runs, in order and each once: embedding, layers[:k], norm, head."""
    mods = [model.model.embed_tokens, *model.model.layers[:k], model.model.norm, model.lm_head]
    out, seen = [], set()
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def test_create_truncated_router_is_a_module_over_the_models_own_tensors():
    model = tiny_model("llama")
    router = create_truncated_router(model, num_layers=2)
    assert isinstance(router, torch.nn.Module)
    assert not router._parameters and not router._buffers and not router._modules  # owns nothing
    params = list(router.parameters())
    expected = _shared_expected(model, 2)
    assert len(params) == len(expected) and all(p is q for p, q in zip(params, expected))
    assert not any(p is q for p in params for q in model.model.layers[2].parameters())
    # named as in the model, the very same objects
    own = dict(model.named_parameters())
    assert all(own[n] is p for n, p in router.named_parameters())
    own_buffers = {id(b) for b in model.buffers()}
    assert list(router.buffers()) and all(id(b) in own_buffers for b in router.buffers())
    assert list(router.parameters(recurse=False)) == []
    # state_dict: the model's keys and tensors, a subset of the model's state_dict
    sd, msd = router.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    assert list(sd) and all(sd[k] is msd[k] for k in sd)
    assert "lm_head.weight" in sd and "model.norm.weight" in sd and "model.layers.1.mlp.up_proj.weight" in sd
    assert not any(k.startswith("model.layers.2.") for k in sd)
    assert str(router.load_state_dict(router.state_dict())) == "<All keys matched successfully>"


def test_create_truncated_router_dedups_a_tied_head():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    router = create_truncated_router(model, num_layers=1)
    params = list(router.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert sum(p is model.lm_head.weight for p in params) == 1
    mods = [model.transformer.wte, model.transformer.wpe, model.transformer.h[0], model.transformer.ln_f]
    assert {id(p) for p in params} == {id(p) for m in mods for p in m.parameters()}
    assert len(list(router.named_parameters(remove_duplicate=False))) == len(params) + 1


def test_create_truncated_router_leaves_the_model_unchanged():
    model = tiny_model("llama")
    names, ids = [n for n, _ in model.named_parameters()], [id(p) for p in model.parameters()]
    keys, modules = list(model.state_dict()), [id(m) for m in model.modules()]
    router = create_truncated_router(model, num_layers=2)
    router.train()
    router(batch("llama")["input_ids"])
    assert [n for n, _ in model.named_parameters()] == names and [id(p) for p in model.parameters()] == ids
    assert list(model.state_dict()) == keys and [id(m) for m in model.modules()] == modules
    # held by a user's module beside the model, nothing is registered twice
    holder = torch.nn.Module()
    holder.model, holder.router = model, router
    assert [id(p) for p in holder.parameters()] == ids
    assert list(holder.state_dict()) == [f"model.{k}" for k in keys]
    holder.load_state_dict(holder.state_dict())  # strict: no unexpected router keys


def test_create_truncated_router_call_is_the_truncated_routers_logits():
    from cggr_compile.router import build_router

    model = tiny_model("llama")
    b = batch("llama")
    router = create_truncated_router(model, num_layers=2)
    reference, _ = build_router(model, 2)
    with torch.enable_grad():
        out = router(b["input_ids"], b["attention_mask"])
    assert out.shape == (*b["input_ids"].shape, model.config.vocab_size) and not out.requires_grad
    torch.testing.assert_close(out, reference(b["input_ids"], b["attention_mask"]), rtol=0, atol=0)
    torch.testing.assert_close(router(b["input_ids"]), reference(b["input_ids"]), rtol=0, atol=0)
    torch.testing.assert_close(router.hidden(b["input_ids"]), reference.hidden(b["input_ids"]), rtol=0, atol=0)
    assert router.linear_head is model.lm_head and router.head is model.lm_head
    assert router.softcap is None and router.num_layers == 2 and router.arch.model_type == "llama"


def test_create_truncated_router_scores_without_dropout_whatever_its_mode():
    import transformers as T

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=64, n_positions=64,
                                           resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)).train()
    ids = batch("gpt2")["input_ids"]
    assert not torch.equal(model(ids).logits, model(ids).logits)  # the model itself does drop out
    router = create_truncated_router(model, num_layers=2)
    for mode in ("eval", "train"):
        assert getattr(router, mode)() is router
        assert router.training == (mode == "train") and model.training  # the model's mode is its own
        torch.testing.assert_close(router(ids), router(ids), rtol=0, atol=0)
    model.eval()
    router.train()
    assert not model.training
    torch.testing.assert_close(router(ids), router(ids), rtol=0, atol=0)


def test_an_optimizer_over_router_parameters_steps_the_models_weights():
    model = tiny_model("llama")
    b = batch("llama")
    router = create_truncated_router(model, num_layers=1)
    opt = torch.optim.SGD(router.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**b).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.0.mlp.up_proj.weight" in changed and "lm_head.weight" in changed
    assert not any(n.startswith("model.layers.1.") or n.startswith("model.layers.2.") for n in changed)


def test_create_truncated_router_to_moves_the_whole_model_and_refuses_dtype_changes():
    model = tiny_model("llama")
    router = create_truncated_router(model, num_layers=1)
    assert router.to("cpu") is router and router.cpu() is router
    assert router.to(torch.float32) is router and router.float() is router  # already so: no-op
    with pytest.raises(TypeError, match="shares the model's own parameters"):
        router.half()
    with pytest.raises(TypeError, match="model.to"):
        router.to("cpu", torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    router.to("meta")  # another device: the whole model moves, never only its router part
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    own = dict(model.named_parameters())
    assert all(own[n] is p for n, p in router.named_parameters())


def test_create_truncated_router_is_refreshed_by_cggr_model():
    model = tiny_model("llama")
    b = batch("llama")
    router = create_truncated_router(model, num_layers=1)
    calls = []
    inner_refresh = router.router.refresh
    router.router.refresh = lambda: calls.append(1) or inner_refresh()
    cm = CGGRModel(model, router=router, min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False)
    cm(b["input_ids"], labels=b["labels"]).backward()
    assert calls


@pytest.mark.parametrize("num_layers", [0, 3, 7])
def test_create_truncated_router_bad_num_layers_is_named(num_layers):
    with pytest.raises(ValueError, match=r"num_layers=\d+ is out of range.*1 <= num_layers < 3"):
        create_truncated_router(tiny_model("llama"), num_layers=num_layers)
