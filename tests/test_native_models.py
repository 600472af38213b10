"""Models that are not Hugging Face's (nanoGPT, torchtitan): the truncated router from the detected
layout, their calling conventions, and gradient parity on both entry points and both granularities
against a reference that scores in float64 and selects the same rows (or tokens) by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cggr_compile
from cggr_compile import ModelCall, RouterSpec, detect_router_spec
from cggr_compile.backend import last_metrics
from cggr_compile.errors import CGGRFallbackError
from models import reference_selection
from native_models import WithLoss, nanogpt, shifted_batch, torchtitan_llama

K = 1  # router layers
RATIO = 0.5
OPTIONS = dict(router_layers=K, min_tokens_ratio=RATIO, warmup_steps=0, dynamic_threshold=False, scoring="loss",
               strict=True, selection="topk")
IGNORE = {"nanogpt": -1, "torchtitan": -100}


def make(name):
    model = nanogpt() if name == "nanogpt" else torchtitan_llama()
    x, y = shifted_batch(ignore_index=IGNORE[name])
    return model, x, y


def reference_router_logits(name, model, x):
    """The model's head on its final norm of the hidden state after K blocks, computed here from
    the model's modules the way its own forward does (eval mode), in float64."""
    was = model.training
    model.eval()
    with torch.no_grad():
        if name == "nanogpt":
            tr = model.transformer
            h = tr.wte(x) + tr.wpe(torch.arange(x.shape[1]))
            for block in tr.h[:K]:
                h = block(h)
            logits = model.lm_head(tr.ln_f(h))
        else:
            h = model.tok_embeddings(x)
            for layer in list(model.layers.values())[:K]:
                h = layer(h, model.freqs_cis)  # the whole table, as torchtitan passes it
            logits = model.output(model.norm(h))
    model.train(was)
    return logits.double()


def reference_targets(name, y):
    """The targets the router scores (pre-shifted: no shift here) and where they count."""
    target = torch.where(y == IGNORE[name], torch.full_like(y, -100), y)
    return target, target != -100


def reference_step(name, model, x, y, selection, target, valid, granularity):
    """Loss and gradients of the plain model on the hand-selected rows/tokens."""
    model.zero_grad()
    rows = selection if granularity == "sequences" else torch.arange(x.shape[0])
    logits = model(x[rows], y[rows])[0] if name == "nanogpt" else model(x[rows])
    keep = valid[rows] if granularity == "sequences" else selection & valid
    loss = F.cross_entropy(logits.float()[keep], target[rows][keep], reduction="mean")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def run_transform(name, model, x, y, granularity):
    cg = cggr_compile.transform(model, granularity=granularity, **OPTIONS)
    if name == "nanogpt":
        selection, _, _ = cg.select(x, None, y, record=False)  # what the step below selects
        logits, loss = cg(x, y)  # nanoGPT's own call: positional, targets, a (logits, loss) tuple
    else:
        out = cg(x, labels=y)  # torchtitan's forward takes no labels: CGGR computes the loss
        logits, loss = out.logits, out.loss
        selection = out["selected_indices"] if granularity == "sequences" else out["selected_mask"]
    loss.backward()
    return loss.detach(), selection, logits


def run_backend(name, model, x, y, granularity):
    options = dict(granularity=granularity, **OPTIONS)
    if name == "nanogpt":
        compiled = torch.compile(model, backend="cggr", options=options)
        logits, loss = compiled(x, targets=y)
        metrics = last_metrics(model)
    else:
        step = WithLoss(model)  # torchtitan's loss is outside the model: compile the training step
        compiled = torch.compile(step, backend="cggr", options=options)
        loss, logits = compiled(x, y), None
        metrics = last_metrics(step)
    loss.backward()
    return loss.detach(), metrics["selected_indices" if granularity == "sequences" else "selected_mask"], logits


@pytest.mark.parametrize("granularity", ["sequences", "tokens"])
@pytest.mark.parametrize("entry", ["transform", "backend"])
@pytest.mark.parametrize("name", ["nanogpt", "torchtitan"])
def test_parity(name, entry, granularity):
    torch._dynamo.reset()
    model, x, y = make(name)
    target, valid = reference_targets(name, y)
    selection = reference_selection(reference_router_logits(name, model, x), target, valid, granularity, RATIO)
    ref_loss, ref_grads = reference_step(name, model, x, y, selection, target, valid, granularity)

    model.zero_grad()
    loss, got_selection, logits = (run_transform if entry == "transform" else run_backend)(
        name, model, x, y, granularity)
    assert torch.equal(got_selection.cpu(), selection), (got_selection, selection)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
        else:
            assert p.grad is None or not p.grad.any(), n
    if granularity == "sequences" and logits is not None:
        # The main pass ran on the selected rows only, with every position's logits.
        assert tuple(logits.shape[:2]) == (selection.numel(), x.shape[1])


@pytest.mark.parametrize("name", ["nanogpt", "torchtitan"])
def test_router_logits_are_head_of_final_norm_after_k_blocks(name):
    model = nanogpt(dropout=0.5) if name == "nanogpt" else torchtitan_llama()  # dropout: the router has none
    x, _ = shifted_batch()
    cg = cggr_compile.transform(model, router_layers=2)
    global K
    k, K = K, 2
    try:
        ref = reference_router_logits(name, model, x)
    finally:
        K = k
    torch.testing.assert_close(cg.router(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert model.training  # scoring in eval mode left the model's own mode alone


def test_detected_layouts():
    gpt = detect_router_spec(nanogpt())
    assert gpt == RouterSpec("transformer.wte", "transformer.h", "transformer.ln_f", "lm_head",
                             position_embedding="transformer.wpe", layout="nanogpt")
    titan = detect_router_spec(torchtitan_llama())
    assert titan == RouterSpec("tok_embeddings", "layers", "norm", "output", block_args=("freqs_cis",),
                               layout="torchtitan")
    # inside a wrapper that computes the loss: found at its path, and the main pass calls it for logits
    wrapped = detect_router_spec(WithLoss(torchtitan_llama()))
    assert wrapped.blocks == "model.layers" and wrapped.block_args == ("model.freqs_cis",) and wrapped.root == "model"
    assert cggr_compile.router.model_call_for(WithLoss(torchtitan_llama())) == ModelCall(
        "tokens", "labels", None, labels_shifted=True, logits_module="model")
    assert cggr_compile.router.model_call_for(nanogpt()) == ModelCall(
        "idx", "targets", None, labels_shifted=True, ignore_index=-1, labels_to_model=True, logits_index=0,
        loss_index=1)


def test_litgpt_layout_calls_blocks_with_its_rope_buffers():
    """litgpt: nanoGPT's names without wpe; blocks get the model's cos / sin tables cut to T rows."""

    class LitBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, cos, sin, mask=None, input_pos=None):
            assert cos.shape[0] == x.shape[1] and sin.shape[0] == x.shape[1]
            return x + self.proj(x) * cos.sum() + sin.sum()

    class LitGPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(8, 16, bias=False)
            self.transformer = torch.nn.ModuleDict(dict(
                wte=torch.nn.Embedding(16, 8), h=torch.nn.ModuleList([LitBlock(), LitBlock()]),
                ln_f=torch.nn.LayerNorm(8)))
            self.register_buffer("cos", torch.rand(20, 4), persistent=False)
            self.register_buffer("sin", torch.rand(20, 4), persistent=False)

        def forward(self, idx, input_pos=None):
            t = idx.shape[1]
            x = self.transformer.wte(idx)
            for block in self.transformer.h:
                x = block(x, self.cos[:t], self.sin[:t])
            return self.lm_head(self.transformer.ln_f(x))

    torch.manual_seed(0)
    model = LitGPT()
    spec = detect_router_spec(model)
    assert spec.layout == "litgpt" and spec.block_args == ("cos", "sin") and spec.position_embedding is None
    ids = torch.randint(0, 16, (2, 5))
    router = cggr_compile.transform(model, router_layers=1).router
    h = model.transformer.h[0](model.transformer.wte(ids), model.cos[:5], model.sin[:5])
    torch.testing.assert_close(router(ids), model.lm_head(model.transformer.ln_f(h)))
    # litgpt shifts its labels in the loss (logits[..., :-1] against targets[..., 1:]): so does CGGR
    assert not cggr_compile.router.model_call_for(model).labels_shifted


def test_eval_and_no_targets_run_the_plain_model():
    model, x, y = make("nanogpt")
    cg = cggr_compile.transform(model, **OPTIONS)
    logits, loss = cg(x)  # no targets: nanoGPT's own inference path (the last position's logits)
    assert logits.shape[1] == 1 and loss is None
    model.eval()
    got, ref = cg(x, y), model(x, y)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, h):
        return h + self.fc(h)


def test_unknown_layout_says_what_to_pass():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.stack = torch.nn.ModuleList([Residual() for _ in range(3)])
            self.final = torch.nn.LayerNorm(8)
            self.proj = torch.nn.Linear(8, 16)

        def forward(self, tokens, targets=None):
            h = self.emb(tokens)
            for layer in self.stack:
                h = layer(h)
            return self.proj(self.final(h))

    model = Custom()
    with pytest.raises(CGGRFallbackError, match=r"router_spec=cggr_compile.RouterSpec\(embedding=.*blocks="):
        cggr_compile.transform(model, strict=True)
    spec = RouterSpec(embedding="emb", blocks="stack", norm="final", head="proj")
    cg = cggr_compile.transform(model, router_spec=spec, **OPTIONS)
    ids = torch.randint(0, 16, (4, 6))
    h = model.stack[0](model.emb(ids))
    torch.testing.assert_close(cg.router(ids), model.proj(model.final(h)))
    out = cg(ids, ids)  # targets= by position, unshifted (the layout's convention is unknown: HF's)
    out.loss.backward()
    assert out.logits.shape[0] == 2
    with pytest.raises(ValueError, match=r"router_spec.norm='ln_f' names no submodule of Custom"):
        cggr_compile.transform(model, router_spec=RouterSpec("emb", "stack", "ln_f", "proj"), strict=True)
    with pytest.raises(ValueError, match=r"router_layers=3 is out of range for this custom model with 3 blocks"):
        cggr_compile.transform(model, router_spec=spec, router_layers=3)


def test_user_router_on_nanogpt():
    """The issue's case: nanoGPT with the documented router= died with `GPT.forward() got an
    unexpected keyword argument 'input_ids'` in the main pass."""
    model, x, y = make("nanogpt")
    calls = []

    def router(input_ids, attention_mask=None):
        calls.append(input_ids.shape)
        return reference_router_logits("nanogpt", model, input_ids).float()

    cg = cggr_compile.transform(model, router=router, **OPTIONS)
    logits, loss = cg(x, y)
    loss.backward()
    assert calls == [x.shape] and logits.shape[0] == 3 and model.lm_head.weight.grad is not None


@pytest.mark.parametrize("name", ["nanogpt", "torchtitan"])
def test_compiled_transform_matches_eager(name):
    """torch.compile(transform(model)): Dynamo traces the calling convention too (positional
    inputs, the tuple output) and gives the eager step's loss and gradients."""
    torch._dynamo.reset()
    model, x, y = make(name)
    cg = cggr_compile.transform(model, **OPTIONS)

    def step(fn):
        model.zero_grad()
        out = fn(x, y) if name == "nanogpt" else fn(x, labels=y)
        loss = out[1] if name == "nanogpt" else out.loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = step(cg)
    loss, grads = step(torch.compile(cg))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_explain_reads_the_models_own_names():
    gpt, x, y = make("nanogpt")
    text = cggr_compile.explain(gpt, x, None, y, **OPTIONS)
    # the router runs on all 6 rows, the main pass and its logits on the k = 3 selected ones
    assert "-> float32[6, 12, 64]" in text and "float32[3, 12, 64]" in text
    titan, x, y = make("torchtitan")
    assert "float32[3, 12, 64]" in cggr_compile.explain(WithLoss(titan), x, None, y, **OPTIONS)
    with pytest.raises(ValueError, match="takes no labels.*explain the module that computes the loss"):
        cggr_compile.explain(titan, x, None, y, **OPTIONS)


def test_model_call_given_in_the_config():
    """An explicit ModelCall and RouterSpec are used as given (here nanoGPT's, spelled out:
    pre-shifted targets, ignore index -1, the tuple output); bad types say what to pass."""
    model, x, y = make("nanogpt")
    call = ModelCall("idx", "targets", None, labels_shifted=True, ignore_index=-1, labels_to_model=True,
                     logits_index=0, loss_index=1)
    spec = detect_router_spec(model)
    options = dict(OPTIONS, min_tokens_ratio=1.0)  # every row: the loss is the model's own
    cg = cggr_compile.transform(model, router_spec=spec, model_call=call, **options)
    logits, loss = cg(x, targets=y)
    torch.testing.assert_close(loss, model(x, y)[1])
    with pytest.raises(TypeError, match="model_call must be a cggr_compile.ModelCall"):
        cggr_compile.transform(model, model_call={"inputs": "idx"})
    with pytest.raises(TypeError, match="router_spec must be a cggr_compile.RouterSpec"):
        cggr_compile.transform(model, router_spec="transformer.h")

    class Wrapper(torch.nn.Module):  # forward(**kwargs): Hugging Face's names pass through
        def forward(self, **kwargs):
            return kwargs

    assert cggr_compile.router.model_call_for(Wrapper()) == ModelCall()


def test_lora_on_nanogpt_routes_with_the_truncated_router():
    """A PeftModel around a nanoGPT passes its arguments on: CGGR reads the inner model's names and
    layout (the router runs its first blocks, LoRA included); gradients match the hand-selected
    reference and reach only the LoRA weights."""
    peft = pytest.importorskip("peft")
    base, x, y = make("nanogpt")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    target, valid = reference_targets("nanogpt", y)
    selection = reference_selection(reference_router_logits("nanogpt", base, x), target, valid, "sequences", RATIO)
    ref_loss, ref_grads = reference_step("nanogpt", model, x, y, selection, target, valid, "sequences")
    loss, got, _ = run_transform("nanogpt", model, x, y, "sequences")
    assert torch.equal(got, selection)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_grads and all("lora_" in n for n in ref_grads)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
        else:
            assert p.grad is None, n
