"""PEFT / LoRA: the truncated router on every entry point, always scoring with the live adapters.

Also the attributes a user toggles on a plain model: the router's clones follow them.
"""

from __future__ import annotations

import pytest
import torch

import cggr_compile
from cggr_compile.backend import core_of
from cggr_compile.router import TruncatedRouter
from models import batch, tiny_model

OPTS = dict(router_layers=2, warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.5, selection="topk",
            scoring="loss",
            strict=True)


def lora_model(seed: int = 0):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", layers=3, seed=seed)
    # init_lora_weights=False: random B too, so that every adapter changes the router's scores.
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0, init_lora_weights=False))
    pm.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                            lora_dropout=0.0, init_lora_weights=False))
    pm.train()
    return pm


def live_first_layers(model, b, k: int) -> torch.Tensor:
    """The live model's logits from its first ``k`` layers, final norm and head."""
    with torch.no_grad():
        out = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        return model.lm_head(model.model.norm(out.hidden_states[k]))


def test_truncated_router_on_every_entry_point():
    pm = lora_model()
    b = batch("llama")
    cg = cggr_compile.transform(pm, **OPTS)  # strict: the whole-model fallback would raise
    assert isinstance(cg.router, TruncatedRouter)
    cg(**b).loss.backward()
    assert isinstance(cggr_compile.CGGRModel(pm, **OPTS).router, TruncatedRouter)
    pm.zero_grad()
    compiled = torch.compile(pm, backend="cggr", options=OPTS)
    compiled(**b).loss.backward()
    assert isinstance(core_of(pm).router, TruncatedRouter)
    torch.testing.assert_close(cggr_compile.last_metrics(pm)["selected_indices"],
                               cggr_compile.last_metrics(cg)["selected_indices"])


def test_router_follows_adapter_toggles():
    pm = lora_model()
    base = pm.get_base_model()
    b = batch("llama")
    cg = cggr_compile.transform(pm, **OPTS)
    states = {}

    def check(state: str) -> None:
        cg(**b)  # a routed step: the router is brought up to date before it scores
        got = cg.router(b["input_ids"], b["attention_mask"])
        want = live_first_layers(base, b, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"router stale under {state}")
        states[state] = want

    check("default")
    with pm.disable_adapter():
        check("disabled")
    check("default again")
    pm.set_adapter("other")
    check("other")
    pm.set_adapter("default")
    pm.merge_adapter()
    check("merged")
    pm.unmerge_adapter()
    check("unmerged")
    # the states differ, so equal outputs above are no accident
    assert not torch.allclose(states["default"], states["disabled"])
    assert not torch.allclose(states["default"], states["other"])
    torch.testing.assert_close(states["merged"], states["default"], rtol=1e-4, atol=1e-5)


def test_compiled_and_backend_routers_follow_disable_adapter():
    """The backend (and torch.compile of the transform) re-trace when an adapter is toggled; the
    rewritten step then selects what the live model's first layers score."""
    b = batch("llama")
    pm_t, pm_b = lora_model(), lora_model()
    cg = torch.compile(cggr_compile.transform(pm_t, **OPTS))
    compiled = torch.compile(pm_b, backend="cggr", options=OPTS)
    for disabled in (False, True, False):
        ctx_t = pm_t.disable_adapter() if disabled else torch.enable_grad()
        ctx_b = pm_b.disable_adapter() if disabled else torch.enable_grad()
        with ctx_t, ctx_b:
            out_t = cg(**b)
            out_b = compiled(**b)
            logits = live_first_layers(pm_t.get_base_model(), b, 2)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:],
                                                reduction="none", ignore_index=-100)
        valid = (b["labels"][:, 1:] != -100).float()
        want = torch.topk((nll * valid).sum(-1) / valid.sum(-1), 3).indices
        assert sorted(out_t.selected_indices.tolist()) == sorted(want.tolist()), disabled
        assert sorted(cggr_compile.last_metrics(pm_b)["selected_indices"].tolist()) == sorted(want.tolist())
        torch.testing.assert_close(out_b.loss, out_t.loss, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_lora_parameters_of_the_selected_rows():
    pm, ref = lora_model(), lora_model()
    b = batch("llama")
    cg = cggr_compile.transform(pm, **OPTS)
    out = cg(**b)
    out.loss.backward()
    idx = out.selected_indices
    assert idx.numel() == 3
    # the same model trained on the selected rows alone
    ref(input_ids=b["input_ids"][idx], attention_mask=b["attention_mask"][idx], labels=b["labels"][idx]).loss.backward()
    trained = 0
    for (name, p), q in zip(pm.named_parameters(), ref.parameters()):
        if "lora_" in name and ".default." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
            trained += 1
        else:  # frozen base weights and the inactive adapter
            assert p.grad is None, name
    assert trained == 3 * 2 * 2  # layers x (q, v) x (A, B)


def test_router_follows_attributes_a_user_toggles():
    """Without PEFT: a plain attribute set on a layer after the transform (here attention's
    scaling) reaches the router's layers, as does a layer the user replaces."""
    model = tiny_model("llama")
    b = batch("llama")
    cg = cggr_compile.transform(model, **OPTS)
    cg(**b).loss.backward()
    torch.testing.assert_close(cg.router(b["input_ids"], b["attention_mask"]), live_first_layers(model, b, 2))
    model.model.layers[0].self_attn.scaling = 0.02
    model.model.layers[1].mlp = torch.nn.Identity()
    cg(**b).loss.backward()
    want = live_first_layers(model, b, 2)
    torch.testing.assert_close(cg.router(b["input_ids"], b["attention_mask"]), want, rtol=0, atol=0)


def test_enable_cggr_on_a_peft_model_uses_the_truncated_router(tmp_path):
    import transformers as T

    pm = lora_model()
    rows = [{k: v[i] for k, v in batch("llama", b=8).items()} for i in range(8)]
    args = T.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                               disable_tqdm=True, per_device_train_batch_size=4, max_steps=2, logging_steps=1)
    trainer = T.Trainer(model=pm, args=args, train_dataset=rows)
    cg = cggr_compile.enable_cggr(trainer, **OPTS)
    assert isinstance(cg.router, TruncatedRouter)
    trainer.train()
    assert cg.schedule.step == 2 and cggr_compile.last_metrics(cg)["selected_indices"].shape == (2,)
