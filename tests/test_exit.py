"""scoring='predicted': the learned exit (cggr_compile/exit.py) on both entry points.

Parity per architecture against an eager float64 reference that predicts each row's loss from the
hidden state after K layers with the exit's weights, selects the same rows by hand, trains them,
and refits the exit from their per-token losses by hand; then cold start, faults, state and resume.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import cggr_compile
from cggr_compile.backend import core_of, last_metrics
from cggr_compile.exit import ExitLayout, FitInputs, LearnedExit, fit, predict
from models import ARCHITECTURES, MASKED, batch, tiny_model
from test_parity import reference_final_hidden, reference_step, reference_targets

K = 1
RATIO = 0.5
DECAY, RIDGE = 0.9, 1e-2
OPTIONS = dict(router_layers=K, min_tokens_ratio=RATIO, warmup_steps=0, scoring="predicted", selection="topk",
               exit_decay=DECAY, exit_ridge=RIDGE, exit_min_fits=1, strict=True)


def reference_hidden(name, model, b):
    """The router's hidden state (the final norm after K layers), float64."""
    return reference_final_hidden(name, model, b).double()


def warm_state(hidden: int, seed: int = 0) -> torch.Tensor:
    """A fitted-looking exit state: random weights, a prior of unit statistics, ready to rank."""
    layout = ExitLayout(hidden)
    g = torch.Generator().manual_seed(seed)
    d = layout.dim
    weights = torch.randn(d, generator=g) * 0.5
    gram = torch.eye(d) * 20.0
    scalars = {n: torch.tensor(0.0) for n in ("fits", "weight_sum", "solved", "rank_num", "rank_den", "r2_num",
                                             "r2_den", "failed_solves")}
    scalars.update(fits=torch.tensor(5.0), weight_sum=torch.tensor(100.0), solved=torch.tensor(1.0))
    return layout.pack(gram, gram @ weights, weights, scalars)


def reference_fit(state, x, y, w):
    """The exit's ridge fit in float64: decayed statistics plus this batch's, Jacobi-scaled solve."""
    layout = ExitLayout(x.shape[-1])
    s = state.double()
    xs = torch.cat([x.reshape(-1, x.shape[-1]), torch.ones(x[..., 0].numel(), 1, dtype=torch.float64)], 1)
    ww, yy = w.reshape(-1).double(), y.reshape(-1).double()
    gram = DECAY * layout.gram(s) + xs.t() @ (xs * ww[:, None])
    moment = DECAY * layout.moment(s) + xs.t() @ (ww * yy)
    scale = torch.diagonal(gram).clamp(min=1e-12).rsqrt()
    a = gram * scale[:, None] * scale[None, :] + RIDGE * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(a, moment * scale) * scale


def reference_row_choice(pred, valid, k):
    """Top-k rows by mean predicted loss over valid positions, ties to the lower index."""
    seq = torch.where(valid, pred, torch.zeros_like(pred)).sum(1) / valid.sum(1).clamp(min=1)
    seq = torch.where(valid.any(1), seq, torch.full_like(seq, -math.inf))
    order = sorted(range(seq.numel()), key=lambda i: (-seq[i].item(), i))
    return torch.tensor(sorted(order[:k]))


def reference_token_loss(name, model, b, rows, target):
    """The plain model's per-token loss (float64) of ``rows``, aligned like the router's targets."""
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"][rows], attention_mask=b["attention_mask"][rows]).logits.double()
    tgt = target[rows]
    return F.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")


def run_entry(entry, model, b, state, hidden, **extra):
    """One training step through ``entry`` from the exit ``state``; the output and the CGGR core."""
    options = dict(OPTIONS, **extra)
    saved = {"exit": {"hidden": hidden, "state": state}}
    if entry == "transform":
        cg = cggr_compile.transform(model, **options)
        cggr_compile.load_cggr_state_dict(cg, saved)
        out = cg(**b)
        core = cg
    else:
        cggr_compile.load_cggr_state_dict(model, saved)
        out = torch.compile(model, backend="cggr", options=options)(**b)
        core = core_of(model)
    out.loss.backward()
    key = "selected_indices" if options.get("granularity", "sequences") == "sequences" else "selected_mask"
    return out, core, core.metrics()[key]


@pytest.mark.parametrize("entry", ["transform", "backend"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_parity_sequences(name, entry):
    model = tiny_model(name)
    b = batch(name)
    target, valid = reference_targets(name, b)
    h = reference_hidden(name, model, b)
    state = warm_state(h.shape[-1])
    weights = ExitLayout(h.shape[-1]).weights(state).double()
    pred = h @ weights[:-1] + weights[-1]
    rows = reference_row_choice(pred, valid, math.ceil(RATIO * b["input_ids"].shape[0]))
    ref_loss, ref_grads = reference_step(model, b, rows, target, valid, "sequences")
    tok_loss = reference_token_loss(name, model, b, rows, target)
    ref_weights = reference_fit(state, h[rows], tok_loss, valid[rows])

    model.zero_grad()
    out, core, selection = run_entry(entry, model, b, state, h.shape[-1])
    assert torch.equal(selection.cpu(), rows), (selection, rows)
    torch.testing.assert_close(out.loss.detach(), ref_loss.float(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    got = core.exit.layout.weights(core.exit.state).double()
    torch.testing.assert_close(got, ref_weights, rtol=2e-3, atol=2e-4)
    metrics = core.metrics()
    assert float(metrics["exit_ready"]) == 1.0 and float(metrics["exit_fits"]) == 6.0


@pytest.mark.parametrize("entry", ["transform", "backend"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "mamba"])
def test_parity_tokens(name, entry):
    """Tokens: the top predicted tokens enter the loss, and every valid position fits the exit."""
    model = tiny_model(name)
    b = batch(name)
    target, valid = reference_targets(name, b)
    h = reference_hidden(name, model, b)
    state = warm_state(h.shape[-1], seed=1)
    weights = ExitLayout(h.shape[-1]).weights(state).double()
    pred = torch.where(valid, h @ weights[:-1] + weights[-1], torch.full_like(valid, -math.inf, dtype=torch.float64))
    n = int(valid.sum())
    order = sorted(range(pred.numel()), key=lambda i: (-pred.flatten()[i].item(), i))[: math.ceil(RATIO * n)]
    mask = torch.zeros(pred.numel(), dtype=torch.bool)
    mask[order] = True
    mask = mask.view_as(valid)
    ref_loss, ref_grads = reference_step(model, b, mask, target, valid, "tokens")
    all_rows = torch.arange(b["input_ids"].shape[0])
    ref_weights = reference_fit(state, h, reference_token_loss(name, model, b, all_rows, target), valid)

    model.zero_grad()
    out, core, selection = run_entry(entry, model, b, state, h.shape[-1], granularity="tokens")
    assert torch.equal(selection.cpu(), mask)
    torch.testing.assert_close(out.loss.detach(), ref_loss.float(), rtol=1e-5, atol=1e-6)
    for n_, p in model.named_parameters():
        if n_ in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n_], rtol=1e-4, atol=1e-6, msg=n_)
    torch.testing.assert_close(core.exit.layout.weights(core.exit.state).double(), ref_weights, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("entry", ["transform", "backend"])
@pytest.mark.parametrize("name", ["nanogpt", "torchtitan"])
def test_parity_native_layouts(name, entry):
    """nanoGPT and torchtitan: the exit reads the spec'd router's hidden state (the final norm after
    K blocks) and selects, trains and fits like the hand reference."""
    import test_native_models as N
    from native_models import WithLoss

    model, x, y = N.make(name)
    target, valid = N.reference_targets(name, y)
    with torch.no_grad():
        model.eval()
        if name == "nanogpt":
            tr = model.transformer
            h = tr.ln_f(tr.h[0](tr.wte(x) + tr.wpe(torch.arange(x.shape[1])))).double()
        else:
            h = model.norm(list(model.layers.values())[0](model.tok_embeddings(x), model.freqs_cis)).double()
        model.train()
    state = warm_state(h.shape[-1], seed=2)
    weights = ExitLayout(h.shape[-1]).weights(state).double()
    rows = reference_row_choice(h @ weights[:-1] + weights[-1], valid, math.ceil(RATIO * x.shape[0]))
    ref_loss, _ = N.reference_step(name, model, x, y, rows, target, valid, "sequences")
    saved = {"exit": {"hidden": h.shape[-1], "state": state}}
    model.zero_grad()
    if entry == "transform":
        cg = cggr_compile.transform(model, **OPTIONS)
        cggr_compile.load_cggr_state_dict(cg, saved)
        out = cg(x, y) if name == "nanogpt" else cg(x, labels=y)
        loss = out[1] if name == "nanogpt" else out.loss
    else:
        target_module = model if name == "nanogpt" else WithLoss(model)
        cggr_compile.load_cggr_state_dict(target_module, saved)
        compiled = torch.compile(target_module, backend="cggr", options=OPTIONS)
        loss = compiled(x, targets=y)[1] if name == "nanogpt" else compiled(x, y)
        cg = core_of(target_module)
    assert torch.equal(cg.metrics()["selected_indices"].cpu(), rows)
    torch.testing.assert_close(loss.detach(), ref_loss.float(), rtol=1e-5, atol=1e-6)
    assert float(cg.metrics()["exit_fits"]) == 6.0


def test_peft_lora_trains_with_the_exit_on_both_entry_points():
    """A PEFT model: the exit reads the LoRA'd router's hidden state; only LoRA weights get gradients."""
    from test_peft import lora_model

    b = batch("llama", b=8)
    for entry in ("transform", "backend"):
        torch._dynamo.reset()
        pm = lora_model()
        options = dict(OPTIONS, router_layers=2)
        if entry == "transform":
            run = cggr_compile.transform(pm, **options)
        else:
            run = torch.compile(pm, backend="cggr", options=options)
        for _ in range(2):
            run(**b).loss.backward()
        metrics = cggr_compile.last_metrics(run)
        assert float(metrics["exit_fits"]) == 2.0 and torch.isfinite(cggr_compile.cggr_state_dict(run)["exit"]["state"]).all()
        assert all(p.grad is None for n, p in pm.named_parameters() if "lora" not in n), entry
        assert any(p.grad is not None and p.grad.any() for n, p in pm.named_parameters() if "lora" in n), entry


def test_importance_weights_the_fit_by_the_inverse_draw_probability():
    """With selection='importance' each drawn row fits with its loss weight 1 / (k p)."""
    model = tiny_model("llama")
    b = batch("llama", b=8)
    cg = cggr_compile.transform(model, **dict(OPTIONS, selection="importance"))
    state = warm_state(32)
    cggr_compile.load_cggr_state_dict(cg, {"exit": {"hidden": 32, "state": state}})
    sel, weight, _, fit_inputs = cg.select(**b, record=False, return_fit_inputs=True)
    assert weight.is_floating_point() and torch.equal(fit_inputs.weight, weight)
    target, valid = reference_targets("llama", b)
    h = reference_hidden("llama", model, b)
    tok = reference_token_loss("llama", model, b, sel, target)
    cg.fit_exit(fit_inputs, tok.float())
    torch.testing.assert_close(cg.exit.layout.weights(cg.exit.state).double(),
                               reference_fit(state, h[sel], tok, weight.double()), rtol=2e-3, atol=2e-4)


def test_the_router_runs_no_vocabulary_head():
    model = tiny_model("llama")
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    cg = cggr_compile.transform(model, **OPTIONS)
    cg(**batch("llama")).loss.backward()
    assert len(calls) == 1  # the main pass's head only
    text = cggr_compile.explain(model, batch("llama")["input_ids"], **OPTIONS)
    assert "exit_fit" in text and "log_softmax" not in text and "fused_token_stats" not in text




def test_cold_start_selects_uniformly_and_says_so():
    """Until exit_min_fits fits the selection ignores the exit (two exits of different weights pick
    the same rows) and every row is drawn about equally often; exit_ready says which steps ranked."""
    model = tiny_model("llama")
    b = batch("llama", b=8)
    picks = []
    for seed in (0, 1):
        cg = cggr_compile.transform(copy.deepcopy(model), **dict(OPTIONS, exit_min_fits=1000))
        cold = warm_state(32, seed=seed)
        ExitLayout(32).scalar(cold, "fits").fill_(0.0)  # not fitted: ranks nothing
        cggr_compile.load_cggr_state_dict(cg, {"exit": {"hidden": 32, "state": cold}})
        rows = []
        for _ in range(32):
            sel, _, metrics = cg.select(**b, record=False)
            assert float(metrics.get("exit_ready", 0.0)) == 0.0
            rows.append(sel)
            cg.step()
        picks.append(torch.stack(rows))
    assert torch.equal(picks[0], picks[1])
    counts = torch.bincount(picks[0].flatten(), minlength=8).float()
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean(), counts

    cg = cggr_compile.transform(copy.deepcopy(model), **dict(OPTIONS, exit_min_fits=2))
    ready = []
    for _ in range(4):
        cg(**b).loss.backward()
        ready.append(float(cg.metrics()["exit_ready"]))
    assert ready == [0.0, 0.0, 1.0, 1.0]


def test_non_finite_losses_never_enter_the_fit():
    layout = ExitLayout(8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 8, generator=g), torch.rand(3, 5, generator=g) * 3
    w = torch.ones(3, 5)
    state = layout.new_state()
    poisoned = y.clone()
    poisoned[0, 1], poisoned[2, 3] = float("nan"), float("inf")
    xp = x.clone()
    xp[1, 2, 4] = float("inf")
    got, _ = fit(layout, state, FitInputs(xp, torch.zeros(3, 5), w), poisoned, DECAY, RIDGE, 1)
    w_clean = w.clone()
    w_clean[0, 1] = w_clean[2, 3] = w_clean[1, 2] = 0.0
    want, _ = fit(layout, state, FitInputs(x, torch.zeros(3, 5), w_clean), y, DECAY, RIDGE, 1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_nan_never_reaches_a_selection_and_a_poisoned_state_recovers():
    model = tiny_model("llama")
    b = batch("llama", b=8)
    cg = cggr_compile.transform(model, **dict(OPTIONS, exit_min_fits=2))
    bad = warm_state(32)
    ExitLayout(32).weights(bad)[3] = float("nan")
    cggr_compile.load_cggr_state_dict(cg, {"exit": {"hidden": 32, "state": bad}})
    out = cg(**b)
    assert torch.isfinite(out.loss)
    sel = out["selected_indices"]
    assert sel.numel() == 4 and sel.unique().numel() == 4 and int(sel.max()) < 8
    # The fit found a state that is not finite: it started cold from this batch and refits by itself.
    assert torch.isfinite(cg.exit.state).all()
    assert float(cg.metrics()["exit_fits"]) == 1.0
    for _ in range(2):
        cg(**b).loss.backward()
    assert float(cg.metrics()["exit_ready"]) == 1.0


def test_a_failed_solve_keeps_the_weights_and_drops_the_history():
    layout = ExitLayout(4)
    state = warm_state(4)
    layout.gram(state).copy_(-torch.eye(5) * 1e6)  # not positive definite, whatever the batch adds
    old = layout.weights(state).clone()
    x, y, w = torch.randn(2, 6, 4), torch.rand(2, 6), torch.ones(2, 6)
    new, _ = fit(layout, state, FitInputs(x, torch.zeros(2, 6), w), y, DECAY, RIDGE, 1)
    assert float(layout.scalar(new, "failed_solves")) == 1.0
    torch.testing.assert_close(layout.weights(new), old)
    assert torch.diagonal(layout.gram(new)).min() >= 0  # the batch's own statistics only
    again, _ = fit(layout, new, FitInputs(x, torch.zeros(2, 6), w), y, DECAY, RIDGE, 1)
    assert float(layout.scalar(again, "failed_solves")) == 1.0 and torch.isfinite(layout.weights(again)).all()
    assert not torch.equal(layout.weights(again), old)


def test_the_exit_is_no_model_parameter():
    model = tiny_model("llama")
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    cg = cggr_compile.transform(model, **OPTIONS)
    cg(**batch("llama")).loss.backward()
    assert [id(p) for p in cg.parameters()] == params and list(cg.state_dict()) == keys
    assert cg.exit.state is not None and all(cg.exit.state is not p for p in cg.parameters())


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_resume_restores_the_exit_and_continues_the_run(entry):
    torch.manual_seed(0)
    b = batch("llama", b=8)

    def train(model, steps, state=None):
        if entry == "transform":
            cg = cggr_compile.transform(model, **OPTIONS)
            run = cg
        else:
            run = torch.compile(model, backend="cggr", options=OPTIONS)
            cg = model
        if state is not None:
            cggr_compile.load_cggr_state_dict(cg, state)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        outs = []
        for _ in range(steps):
            out = run(**b)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            outs.append((out.loss.detach().clone(), cggr_compile.last_metrics(cg)["selected_indices"].clone()))
        return cg, outs

    base = tiny_model("llama")
    _, straight = train(copy.deepcopy(base), 4)
    torch._dynamo.reset()
    first = copy.deepcopy(base)
    cg, _ = train(first, 2)
    saved = cggr_compile.cggr_state_dict(cg)
    weights = copy.deepcopy(first.state_dict())
    torch._dynamo.reset()
    resumed = tiny_model("llama")
    resumed.load_state_dict(weights)
    cg2, after = train(resumed, 2, saved)
    for (l1, s1), (l2, s2) in zip(straight[2:], after):
        assert torch.equal(s1, s2)
        torch.testing.assert_close(l1, l2)
    assert float(cggr_compile.last_metrics(cg2)["exit_fits"]) == 4.0


def test_resume_without_the_exit_state_starts_cold_and_refits():
    model = tiny_model("llama")
    cg = cggr_compile.transform(model, **dict(OPTIONS, exit_min_fits=2))
    cggr_compile.load_cggr_state_dict(cg, {"step": 7})  # a checkpoint of the schedule only
    ready = []
    for _ in range(3):
        cg(**batch("llama")).loss.backward()
        ready.append(float(cg.metrics()["exit_ready"]))
    assert cg.schedule.step == 7 and ready == [0.0, 0.0, 1.0]


def test_bad_options_say_what_to_change():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dynamic_threshold=False"):
        cggr_compile.transform(model, router_layers=1, scoring="predicted", dynamic_threshold=True)
    with pytest.raises(ValueError, match="exit_decay"):
        cggr_compile.transform(model, router_layers=1, scoring="predicted", exit_decay=0.0)
    with pytest.raises(ValueError, match="exit_ridge"):
        cggr_compile.transform(model, router_layers=1, scoring="predicted", exit_ridge=0)
    with pytest.raises(ValueError, match="hidden states"):
        cggr_compile.transform(model, scoring="predicted", router=lambda ids, mask: torch.zeros(ids.shape))
    cg = cggr_compile.transform(model, router_layers=1, scoring="predicted")
    with pytest.raises(ValueError, match="hidden size 16"):
        cg.load_cggr_state_dict({"exit": {"hidden": 16, "state": ExitLayout(16).new_state()}})


def test_fit_and_prediction_stay_float32_under_autocast():
    layout = ExitLayout(8)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 5, 8, generator=g) * 3, torch.rand(2, 5, generator=g)
    state = warm_state(8)
    inputs = FitInputs(x, predict(layout, state, x), torch.ones(2, 5))
    want = fit(layout, state, inputs, y, DECAY, RIDGE, 1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fit(layout, state, inputs, y, DECAY, RIDGE, 1)[0]
        pred = predict(layout, state, x)
    assert got.dtype == pred.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(pred, inputs.predicted)


def test_predict_is_finite_where_the_hidden_state_overflows():
    layout = ExitLayout(4)
    state = warm_state(4)
    h = torch.randn(2, 3, 4)
    h[0, 1, 2] = float("inf")
    h[1, 0, 0] = float("nan")
    pred = predict(layout, state, h)
    assert torch.isfinite(pred).all() and pred[0, 1] == 0 and pred[1, 0] == 0


def test_learned_exit_recovers_a_linear_loss():
    """On data whose loss is linear in the hidden state, the online fit finds it (R^2 near 1)."""
    g = torch.Generator().manual_seed(0)
    exit_ = LearnedExit(16, 0.97, 1e-4, 2)
    true_w = torch.randn(16, generator=g)
    scales = torch.logspace(-2, 2, 16)  # features of very different sizes: the ridge is scale-free
    for _ in range(12):
        h = torch.randn(6, 20, 16, generator=g) * scales
        y = (h / scales) @ true_w + 1.5 + 0.01 * torch.randn(6, 20, generator=g)
        state = exit_.state_on(torch.device("cpu"))
        new, metrics = exit_.fit(state, FitInputs(h, exit_.predict(state, h), torch.ones(6, 20)), y)
        exit_.commit(new)
    assert float(metrics["exit_r2"]) > 0.99 and float(metrics["exit_rank_agreement"]) > 0.9
    w = exit_.layout.weights(exit_.state)
    torch.testing.assert_close(w[:-1] * scales, true_w, rtol=0.02, atol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("selection", ["topk", "truncation"])
def test_backend_under_cuda_graphs_fits_like_the_transform_without_skips_or_syncs(selection):
    """On the GPU: Inductor with CUDA graphs runs the exit's fit in the step (no cudagraph skip, no
    host synchronisation) and gives the transform's losses, selections and exit state over 5 steps;
    also with the default selection, truncation (a fixed share here, so that rows are skipped)."""
    from torch._dynamo.utils import counters

    b = {k: v.cuda() for k, v in batch("llama", b=8).items()}
    options = dict(OPTIONS, exit_min_fits=2, selection=selection)
    if selection == "truncation":
        options.update(truncation_share=0.25, truncation_probe=0.25)
    runs = []
    for entry in ("transform", "backend"):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model("llama").cuda()
        run = cggr_compile.transform(model, **options) if entry == "transform" else \
            torch.compile(model, backend="cggr", options=dict(options, cudagraphs=True))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen = []
        for i in range(5):
            if i == 4:
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = run(**b)
                out.loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            opt.step()
            opt.zero_grad()
            seen.append((out.loss.detach().clone(), cggr_compile.last_metrics(run)["selected_indices"].clone()))
        core = run if entry == "transform" else core_of(model)
        runs.append((seen, core.exit.state.clone(), float(core.metrics()["exit_ready"])))
        if entry == "backend":
            assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    (a, state_a, ready_a), (b_, state_b, ready_b) = runs
    for (la, sa), (lb, sb) in zip(a, b_):
        assert torch.equal(sa, sb)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state_a, state_b, rtol=1e-3, atol=1e-3)
    assert ready_a == ready_b == 1.0
