"""passes/fuse_loss: the main pass's loss through the fused head + cross-entropy op (option
fused_loss), on the transform and the backend: same loss and gradients as the unfused path, the op
visible in the rewritten graph, and the reason where it does not apply."""

from __future__ import annotations

import pytest
import torch

import cggr_compile
from cggr_compile.backend import core_of, explain
from cggr_compile.config import CGGRConfig
from cggr_compile.errors import CGGRFallbackError, CGGRFallbackWarning
from cggr_compile.passes.fuse_loss import choose_fused_loss, fused_loss_nodes
from models import CAUSAL, batch, tiny_model

OPTS = dict(strict=True, router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False,
            selection="topk")
OP = "fused_linear_cross_entropy"


def _train_step(name, fused_loss, entry="transform", data=None, **options):
    model = tiny_model(name)
    opts = dict(OPTS, **options)
    data = data or batch(name)
    if entry == "transform":
        out = cggr_compile.transform(model, fused_loss=fused_loss, **opts)(**data)
    elif entry == "compiled_transform":
        out = torch.compile(cggr_compile.transform(model, fused_loss=fused_loss, **opts), backend="aot_eager")(**data)
    else:
        out = torch.compile(model, backend="cggr", options=dict(fused_loss=fused_loss, **opts))(**data)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, out, grads


def _same(a, b):
    (_, out_a, g_a), (_, out_b, g_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss)
    assert g_a.keys() == g_b.keys()
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], msg=n)


@pytest.mark.parametrize("name", CAUSAL)  # plain, tied (gpt2...), soft-capped (gemma2), biased (gptj)
def test_transform_fused_loss_gives_the_unfused_loss_and_gradients(name):
    fused, unfused = _train_step(name, True), _train_step(name, False)
    _same(fused, unfused)
    out = fused[1]
    assert out.get("logits") is None and unfused[1].logits is not None
    k = out["selected_indices"].shape[0]
    assert out["last_hidden_state"].shape[:2] == (k, batch(name)["input_ids"].shape[1])


@pytest.mark.parametrize("options", [dict(granularity="tokens"), dict(selection="importance"),
                                     dict(loss_denominator=40)], ids=["tokens", "importance", "denominator"])
def test_transform_fused_loss_keeps_every_loss_rule(options):
    data = batch("llama")
    if "loss_denominator" in options:
        data["loss_denominator"] = options.pop("loss_denominator")
    _same(_train_step("llama", "auto", data=dict(data), **options),
          _train_step("llama", False, data=dict(data), **options))


def test_no_valid_position_gives_a_connected_zero():
    data = batch("llama")
    data["labels"] = torch.full_like(data["labels"], -100)
    model, out, grads = _train_step("llama", True, data=data)
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("entry", ["backend", "compiled_transform"])
def test_compiled_fused_loss_gives_the_unfused_gradients(entry):
    _same(_train_step("llama", "auto", entry), _train_step("llama", False, "transform"))


def test_backend_graph_shows_the_op_or_why_not():
    model, out, _ = _train_step("llama", "auto", "backend")
    gm = next(iter(core_of(model).routed_graphs[0].graphs.values()))
    assert len(fused_loss_nodes(gm)) == 1 and gm.meta["cggr_fused_loss"] == "fused: llama head 64x32"
    assert out.logits is None
    model, out, _ = _train_step("llama", False, "backend")
    gm = next(iter(core_of(model).routed_graphs[0].graphs.values()))
    assert not fused_loss_nodes(gm) and gm.meta["cggr_fused_loss"] == "fused_loss=False"
    assert out.logits is not None

    data = batch("llama")
    text = explain(tiny_model("llama"), **data, fused_loss="auto", **OPTS)
    assert OP in text and "cross_entropy_loss" not in text
    assert OP not in explain(tiny_model("llama"), **data, **OPTS)


def test_not_applicable_says_why():
    assert choose_fused_loss(tiny_model("bert"), "auto").reason == \
        "bert is a masked LM (its head is not one linear layer)"
    hooked = tiny_model("llama")
    hooked.lm_head.register_forward_hook(lambda *a: None)
    assert "has forward hooks" in choose_fused_loss(hooked, "auto").reason
    with pytest.raises(CGGRFallbackError, match="fused_loss=True, but bert is a masked LM"):
        choose_fused_loss(tiny_model("bert"), True, strict=True)
    with pytest.warns(CGGRFallbackWarning, match="fused_loss='auto'"):
        assert not choose_fused_loss(tiny_model("bert"), True)
    # 'auto' falls back silently and the step trains unfused
    _same(_train_step("bert", "auto"), _train_step("bert", False))


def test_bad_setting_is_refused():
    with pytest.raises(ValueError, match="fused_loss must be False, True or 'auto'"):
        CGGRConfig(fused_loss="yes")


def test_speed_benchmark_full_batch_fused_loss_is_the_models_loss():
    """benchmarks/speed.py --fused-loss: the compiled full-batch mode's fused loss is the model's own
    loss (the mean over the shifted labels that are not -100), with the same gradients."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.harness.step_timing import fused_loss_full_batch

    data = batch("llama")
    model = tiny_model("llama")
    want = model(**data).loss
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    out = fused_loss_full_batch(model)(**data)
    assert out.get("logits") is None
    torch.testing.assert_close(out.loss, want)
    for g, w in zip(torch.autograd.grad(out.loss, list(model.parameters())), want_grads):
        torch.testing.assert_close(g, w)


def _lora(target_modules):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0, init_lora_weights=False))


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_lora_model_fuses_inside_peft_with_the_unfused_gradients(entry):
    data = batch("llama")
    runs = {}
    for fused_loss in (True, False):
        pm = _lora(["q_proj", "v_proj"])
        pm.train()
        opts = dict(OPTS, fused_loss=fused_loss)
        if entry == "transform":
            model = cggr_compile.transform(pm, **opts)
            assert model.__dict__["fused_loss"].reason == ("fused: llama head 64x32 (inside PEFT)" if fused_loss
                                                           else "fused_loss=False")
        else:
            model = torch.compile(pm, backend="cggr", options=opts)
        out = model(**data)
        out.loss.backward()
        if entry == "backend":
            assert core_of(pm).__dict__["fused_loss"].reason.endswith("(inside PEFT)") == fused_loss
        assert (out.get("logits") is None) == fused_loss
        runs[fused_loss] = (out.loss.detach(), {n: p.grad for n, p in pm.named_parameters() if p.grad is not None})
    torch.testing.assert_close(runs[True][0], runs[False][0])
    assert runs[True][1].keys() == runs[False][1].keys() and all("lora" in n for n in runs[True][1])
    for n, g in runs[True][1].items():
        torch.testing.assert_close(g, runs[False][1][n], msg=n)


def test_lora_on_the_head_or_prompt_learning_stays_unfused():
    assert "not one nn.Linear" in choose_fused_loss(_lora(["q_proj", "lm_head"]), "auto").reason
    peft = pytest.importorskip("peft")
    prompt = peft.get_peft_model(tiny_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=2))
    assert "adds its virtual tokens" in choose_fused_loss(prompt, "auto").reason


def test_autocast_runs_the_fused_head_in_the_autocast_dtype():
    """Under autocast the fused head runs in bf16 like the model's nn.Linear would: the same loss and
    gradients as the unfused step (within bf16 rounding), float32 master gradients."""
    data = batch("llama")
    runs = {}
    for fused_loss in (True, False):
        model = tiny_model("llama")
        with torch.autocast("cpu", torch.bfloat16):
            out = cggr_compile.transform(model, fused_loss=fused_loss, **OPTS)(**data)
        out.loss.backward()
        runs[fused_loss] = (out.loss.detach(), [p.grad for p in model.parameters()])
    # tight on the loss: a float32 head would differ by ~1e-3 here, the bf16 one by ~1e-6
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-4)
    for g, r in zip(runs[True][1], runs[False][1]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-3)


def test_speed_benchmark_modes_with_and_without_fused_loss():
    """speed.py: compiled_fused_loss runs only with --fused-loss, which also fuses the CGGR modes'
    and random_subset's loss (the records say so); without it every mode is as before."""
    import os
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import speed
    from benchmarks.harness import step_timing

    assert "compiled_fused_loss" not in speed.parse_args(["--preset", "tiny"]).modes
    modes = speed.parse_args(["--preset", "tiny", "--fused-loss"]).modes
    assert modes == list(step_timing.ALL_MODES)
    ctx = SimpleNamespace(args=SimpleNamespace(fused_loss=True, scoring="loss"), cudagraphs=False)
    assert step_timing.Ctx.cggr_options(ctx, 0.25, 1)["fused_loss"] is True
    ctx.args.fused_loss = False
    assert "fused_loss" not in step_timing.Ctx.cggr_options(ctx, 0.25, 1)
