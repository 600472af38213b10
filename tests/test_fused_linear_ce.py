"""cggr_compile.ops.fused_linear_ce: the fused lm_head + selective cross-entropy against a float64
reference (loss and the gradients w.r.t. hidden, weight and bias), its loss rules, and compilation."""

from __future__ import annotations

import math

import pytest
import torch

from cggr_compile.ops import fused_linear_ce as flce
from cggr_compile.ops.fused_linear_ce import default_chunk_tokens, selective_linear_cross_entropy
from cggr_compile.scoring import selective_cross_entropy


def _inputs(n, h, v, dtype=torch.float32, bias=True, seed=0, ignore=0.2, select=0.7, float_weight=False):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore] = -100
    sel = torch.rand(n, generator=g) < select
    tw = torch.where(sel, torch.rand(n, generator=g) * 3, torch.zeros(n)) if float_weight else sel
    return hid, w, b, y, tw


def _reference(hid, w, b, y, tw, denominator=None, softcap=None):
    """The loss in float64 with the full logits, and its gradients (autograd)."""
    leaves = [t.detach().double().requires_grad_() for t in (hid, w) + ((b,) if b is not None else ())]
    z = leaves[0] @ leaves[1].t()
    if b is not None:
        z = z + leaves[2]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = (y != -100) & (tw != 0)
    nll = -torch.log_softmax(z, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    total = torch.where(valid, tw.double() * nll, torch.zeros_like(nll)).sum()
    if tw.is_floating_point():
        den = tw.double().sum().clamp(min=1e-12) if denominator is None else \
            torch.as_tensor(float(denominator), dtype=torch.float64).clamp(min=1)
    else:
        den = (tw.sum() if denominator is None else torch.as_tensor(denominator)).clamp(min=1).double()
    loss = total / den
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def _fused(hid, w, b, y, tw, **kw):
    loss = selective_linear_cross_entropy(hid, w, b, y, tw, **kw)
    leaves = (hid, w) + ((b,) if b is not None else ())
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _close(got, want, rtol, atol):
    loss, grads = got
    rloss, rgrads = want
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=atol)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("v", [1, 7, 1000, 50257])
@pytest.mark.parametrize("bias", [True, False])
def test_odd_vocabularies_match_float64(v, bias):
    n = 9 if v == 50257 else 23
    hid, w, b, y, tw = _inputs(n, 8, v, bias=bias)
    _close(_fused(hid, w, b, y, tw, chunk_tokens=4), _reference(hid, w, b, y, tw), 1e-4, 1e-5)


@pytest.mark.parametrize("n,chunk", [(1, None), (2, 1), (63, 16), (1000, 97), (1000, None)])
def test_token_counts_and_chunkings_match_float64(n, chunk):
    hid, w, b, y, tw = _inputs(n, 16, 33, seed=n)
    _close(_fused(hid, w, b, y, tw, chunk_tokens=chunk), _reference(hid, w, b, y, tw), 1e-4, 1e-5)


def test_65536_tokens_match_float64():
    hid, w, b, y, tw = _inputs(65536, 4, 5, seed=3)
    _close(_fused(hid, w, b, y, tw, chunk_tokens=8192), _reference(hid, w, b, y, tw), 1e-4, 1e-6)


@pytest.mark.parametrize("denominator", [None, 7, torch.tensor(300)])
def test_float_weights_and_denominators_match_float64(denominator):
    hid, w, b, y, tw = _inputs(50, 8, 31, float_weight=True)
    _close(_fused(hid, w, b, y, tw, denominator=denominator, chunk_tokens=16),
           _reference(hid, w, b, y, tw, denominator), 1e-4, 1e-5)
    tiny = tw * 1e-3  # weights summing below 1: the default normaliser is their sum, not clamped to 1
    _close(_fused(hid, w, b, y, tiny, denominator=denominator, chunk_tokens=16),
           _reference(hid, w, b, y, tiny, denominator), 1e-4, 1e-5)
    hid, w, b, y, tw = _inputs(50, 8, 31)
    _close(_fused(hid, w, b, y, tw, denominator=denominator, chunk_tokens=16),
           _reference(hid, w, b, y, tw, denominator), 1e-4, 1e-5)


def test_softcap_matches_float64():
    hid, w, b, y, tw = _inputs(40, 8, 57)
    _close(_fused(hid, w, b, y, tw, softcap=2.0, chunk_tokens=16), _reference(hid, w, b, y, tw, softcap=2.0),
           1e-4, 1e-5)


def test_equals_the_unfused_selective_cross_entropy():
    """The same numbers as the path it replaces (the loss rules are that function's)."""
    hid, w, b, y, tw = _inputs(3 * 20, 8, 41)
    logits = torch.nn.functional.linear(hid, w, b).reshape(3, 20, 41)
    want = selective_cross_entropy(logits, y.reshape(3, 20), tw.reshape(3, 20))
    got = selective_linear_cross_entropy(hid.reshape(3, 20, 8), w, b, y.reshape(3, 20), tw.reshape(3, 20))
    torch.testing.assert_close(got, want)
    gw, gh = torch.autograd.grad(want, (w, hid))
    fw, fh = torch.autograd.grad(got, (w, hid))
    torch.testing.assert_close(fw, gw)
    torch.testing.assert_close(fh, gh)


@pytest.mark.parametrize("case", ["all_ignored", "none_selected", "zero_float_weights", "no_tokens"])
def test_nothing_to_learn_gives_a_connected_zero(case):
    n = 0 if case == "no_tokens" else 12
    hid, w, b, y, tw = _inputs(n, 8, 9, float_weight=case == "zero_float_weights")
    if case == "all_ignored":
        y = torch.full_like(y, -100)
    else:
        tw = torch.zeros_like(tw)
    loss = selective_linear_cross_entropy(hid, w, b, y, tw)
    assert loss.item() == 0.0 and loss.requires_grad
    for g in torch.autograd.grad(loss, (hid, w, b)):
        assert torch.equal(g, torch.zeros_like(g))


def test_poisoned_buffers_are_fully_written(monkeypatch):
    """Every output buffer pre-filled with NaN: the results are the clean ones, so every element
    (the ignored rows' zero gradients too) is written."""
    hid, w, b, y, tw = _inputs(37, 8, 29)
    clean = _fused(hid, w, b, y, tw, chunk_tokens=8)
    monkeypatch.setattr(flce, "_new_buffer", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype))
    poisoned = _fused(hid, w, b, y, tw, chunk_tokens=8)
    assert all(torch.isfinite(g).all() for g in poisoned[1])
    _close(poisoned, (clean[0].double(), [g.double() for g in clean[1]]), 0, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_the_unfused_half_path_and_float64(dtype):
    hid, w, b, y, tw = _inputs(300, 32, 500, dtype=dtype)
    got = _fused(hid, w, b, y, tw, chunk_tokens=64)
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1])
    logits = torch.nn.functional.linear(hid, w, b)  # the model's head in half precision
    unfused = selective_cross_entropy(logits, y, tw)
    want = (unfused.detach(), torch.autograd.grad(unfused, (hid, w, b)))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    _close((got[0].double(), [g.double() for g in got[1]]),
           (want[0].double(), [g.double() for g in want[1]]), tol, tol)
    _close(got, _reference(hid, w, b, y, tw), 5 * tol, 5 * tol)


def test_frozen_head_and_no_grad():
    hid, w, b, y, tw = _inputs(20, 8, 13)
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss = selective_linear_cross_entropy(hid, w, b, y, tw)
    (gh,) = torch.autograd.grad(loss, (hid,))
    torch.testing.assert_close(gh.double(), _reference(hid, w, b, y, tw)[1][0])
    with torch.no_grad():
        assert not selective_linear_cross_entropy(hid, w, b, y, tw).requires_grad


def test_label_out_of_range_is_nan_not_a_crash():
    hid, w, b, y, tw = _inputs(10, 8, 13, ignore=0.0, select=1.0)
    y[4] = 13
    assert math.isnan(selective_linear_cross_entropy(hid, w, b, y, tw).item())


def test_bad_inputs_say_what_to_change():
    hid, w, b, y, tw = _inputs(10, 8, 13)
    with pytest.raises(TypeError, match="nn.Linear would refuse"):
        selective_linear_cross_entropy(hid.bfloat16(), w, b, y, tw)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\]"):
        selective_linear_cross_entropy(hid, w.t(), b, y, tw)
    with pytest.raises(ValueError, match="target must be"):
        selective_linear_cross_entropy(hid, w, b, y[:5], tw)
    with pytest.raises(ValueError, match="softcap"):
        selective_linear_cross_entropy(hid, w, b, y, tw, softcap=0.0)


def test_default_chunks_bound_the_logits():
    assert default_chunk_tokens(16384, 128256) == 1024
    assert default_chunk_tokens(16384, 49152) == 2048
    assert default_chunk_tokens(5, 128256) == 5
    assert default_chunk_tokens(100000, 10**9) == flce.MIN_CHUNK_TOKENS


def test_compiles_fullgraph_with_inductor_on_cpu():
    """torch.compile(fullgraph=True) of a function using it (Liger 0.8.5 failed here on torch 2.11)."""
    hid, w, b, y, tw = _inputs(2 * 24, 16, 37)

    def step(hid, w, b, y, tw):
        return selective_linear_cross_entropy(torch.tanh(hid) * 2, w, b, y, tw, chunk_tokens=16) * 3

    got = torch.compile(step, fullgraph=True)(hid, w, b, y, tw)
    g = torch.autograd.grad(got, (hid, w, b))
    want = step(hid, w, b, y, tw)
    torch.testing.assert_close(got, want)
    for a, r in zip(g, torch.autograd.grad(want, (hid, w, b))):
        torch.testing.assert_close(a, r)


def test_the_op_is_one_node_of_the_compiled_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    hid, w, b, y, tw = _inputs(16, 8, 11)
    loss = torch.compile(selective_linear_cross_entropy, fullgraph=True, backend=backend)(hid, w, b, y, tw)
    loss.backward()
    ops = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "fused_linear_cross_entropy" in str(n.target)]
    assert len(ops) == 1


def test_compiled_chunk_epilogue_matches(monkeypatch):
    """The Inductor-compiled chunk middle (on by default on CUDA) gives the eager numbers."""
    monkeypatch.setenv("CGGR_FUSED_LOSS_COMPILE_CHUNKS", "1")
    monkeypatch.setattr(flce, "_COMPILED", {})
    hid, w, b, y, tw = _inputs(40, 8, 19)
    _close(_fused(hid, w, b, y, tw, chunk_tokens=16), _reference(hid, w, b, y, tw), 1e-4, 1e-5)
    assert "epilogue" in flce._COMPILED


def test_benchmark_smoke_runs_on_cpu(tmp_path):
    """benchmarks/bench_fused_loss.py --smoke: every path runs, the JSON and the table come out."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import bench_fused_loss

    out = tmp_path / "smoke.json"
    result = bench_fused_loss.main(["--smoke", "--compile-backend", "aot_eager", "--reps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["cases"] and saved["cases"] == json.loads(json.dumps(result["cases"]))
    for case in saved["cases"]:
        assert set(case["paths"]) == {"compiled", "fused", "fused_compiled", "fused_eager_chunks"}
        for name, r in case["paths"].items():
            assert "error" not in r, (name, r)
            assert r["loss_abs_diff"] < 1e-2 and r["grad_hidden_rel_l2"] < 2e-2 and r["grad_weight_rel_l2"] < 2e-2


# -- return_token_loss: the detached per-token loss, for an online fit of the model's own loss ----
def _reference_token_loss(hid, w, b, y, softcap=None):
    """Every labelled position's cross-entropy in float64 from the full logits (0 at -100)."""
    bias = None if b is None else b.detach().double()
    z = torch.nn.functional.linear(hid.detach().double(), w.detach().double(), bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.nn.functional.cross_entropy(z, y, ignore_index=-100, reduction="none")


@pytest.mark.parametrize("float_weight", [False, True], ids=["bool", "importance"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("n,chunk", [(37, 8), (5, 16), (61, None)])
def test_token_loss_matches_float64_and_leaves_the_loss_alone(float_weight, bias, softcap, n, chunk):
    hid, w, b, y, tw = _inputs(n, 8, 29, bias=bias, seed=n, float_weight=float_weight, ignore=0.3, select=0.5)
    y[0], tw[0] = 3, 0  # a labelled position the selection leaves out: it still gets its loss
    y[-1] = -100
    kw = dict(softcap=softcap, chunk_tokens=chunk)
    loss, tok = selective_linear_cross_entropy(hid, w, b, y, tw, return_token_loss=True, **kw)
    assert tok.shape == y.shape and tok.dtype == torch.float32 and not tok.requires_grad
    want = _reference_token_loss(hid, w, b, y, softcap)
    torch.testing.assert_close(tok.double(), want, rtol=1e-4, atol=1e-5)
    assert tok[0] > 0 and torch.equal(tok[y == -100], torch.zeros_like(tok[y == -100]))
    # the loss: the same number and the same gradients as without the flag
    leaves = (hid, w) + ((b,) if b is not None else ())
    plain = _fused(hid, w, b, y, tw, **kw)
    _close((loss.detach().double(), [g.double() for g in torch.autograd.grad(loss, leaves)]),
           (plain[0].double(), [g.double() for g in plain[1]]), 0, 0)


def test_token_loss_keeps_the_target_shape_and_float64():
    hid, w, b, y, tw = _inputs(3 * 7, 8, 13, dtype=torch.float64)
    loss, tok = selective_linear_cross_entropy(hid.reshape(3, 7, 8), w, b, y.reshape(3, 7), tw.reshape(3, 7),
                                               chunk_tokens=4, return_token_loss=True)
    assert tok.shape == (3, 7) and tok.dtype == torch.float64 == loss.dtype and not tok.requires_grad
    torch.testing.assert_close(tok.reshape(-1), _reference_token_loss(hid, w, b, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_loss_of_half_inputs_is_float32(dtype):
    hid, w, b, y, tw = _inputs(50, 16, 40, dtype=dtype)
    _, tok = selective_linear_cross_entropy(hid, w, b, y, tw, chunk_tokens=16, return_token_loss=True)
    assert tok.dtype == torch.float32
    logits = torch.nn.functional.linear(hid, w, b).float()  # the head in half precision, as the op runs it
    want = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="none")
    torch.testing.assert_close(tok, want.detach(), rtol=1e-5, atol=1e-5)


def test_token_loss_is_fully_written_in_poisoned_buffers(monkeypatch):
    hid, w, b, y, tw = _inputs(37, 8, 29)
    _, clean = selective_linear_cross_entropy(hid, w, b, y, tw, chunk_tokens=8, return_token_loss=True)
    monkeypatch.setattr(flce, "_new_buffer", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype))
    for grad in (True, False):  # the forward-only path writes it too
        with torch.set_grad_enabled(grad):
            _, tok = selective_linear_cross_entropy(hid, w, b, y, tw, chunk_tokens=8, return_token_loss=True)
        assert torch.isfinite(tok).all()
        torch.testing.assert_close(tok, clean, rtol=0, atol=0)


def test_token_loss_of_an_out_of_range_label_is_nan_there_only():
    hid, w, b, y, tw = _inputs(10, 8, 13, ignore=0.0, select=1.0)
    y[4], y[6], tw[6] = 13, -1, False  # out of range, selected or not
    y[2] = -100
    loss, tok = selective_linear_cross_entropy(hid, w, b, y, tw, chunk_tokens=4, return_token_loss=True)
    assert math.isnan(loss.item())
    assert torch.isnan(tok[[4, 6]]).all() and tok[2] == 0
    rest = torch.tensor([i not in (2, 4, 6) for i in range(10)])
    torch.testing.assert_close(tok[rest].double(), _reference_token_loss(hid, w, b, torch.where(rest, y, 0))[rest],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["none_selected", "no_tokens", "no_grad"])
def test_token_loss_without_a_loss_to_learn(case):
    hid, w, b, y, tw = _inputs(0 if case == "no_tokens" else 12, 8, 9)
    if case == "none_selected":
        tw = torch.zeros_like(tw)
    with torch.set_grad_enabled(case != "no_grad"):
        loss, tok = selective_linear_cross_entropy(hid, w, b, y, tw, return_token_loss=True)
    assert tok.shape == y.shape and not tok.requires_grad
    torch.testing.assert_close(tok.double(), _reference_token_loss(hid, w, b, y), rtol=1e-4, atol=1e-5)
    if case == "none_selected":
        assert loss.item() == 0.0 and loss.requires_grad


def test_token_loss_compiles_fullgraph_with_inductor_on_cpu():
    hid, w, b, y, tw = _inputs(2 * 24, 16, 37, float_weight=True)

    def step(hid, w, b, y, tw):
        loss, tok = selective_linear_cross_entropy(torch.tanh(hid) * 2, w, b, y, tw, chunk_tokens=16,
                                                   return_token_loss=True)
        return loss * 3, tok

    got, tok = torch.compile(step, fullgraph=True)(hid, w, b, y, tw)
    assert not tok.requires_grad
    g = torch.autograd.grad(got, (hid, w, b))
    want, want_tok = step(hid, w, b, y, tw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(tok, want_tok)
    for a, r in zip(g, torch.autograd.grad(want, (hid, w, b))):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("return_token_loss", [False, True])
def test_the_op_is_one_node_with_or_without_the_token_loss(return_token_loss):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    hid, w, b, y, tw = _inputs(16, 8, 11)

    def f(hid, w, b, y, tw):
        out = selective_linear_cross_entropy(hid, w, b, y, tw, return_token_loss=return_token_loss)
        return out[0] if return_token_loss else out

    torch.compile(f, fullgraph=True, backend=backend)(hid, w, b, y, tw).backward()
    ops = [n for n in graphs[0].graph.nodes
           if n.op == "call_function" and "fused_linear_cross_entropy" in str(n.target)]
    assert len(ops) == 1


def test_compiled_chunk_epilogue_gives_the_eager_token_loss(monkeypatch):
    hid, w, b, y, tw = _inputs(40, 8, 19)
    y[3] = 19  # out of range: NaN in the compiled epilogue too
    _, eager = selective_linear_cross_entropy(hid, w, b, y, tw, chunk_tokens=16, return_token_loss=True)
    monkeypatch.setenv("CGGR_FUSED_LOSS_COMPILE_CHUNKS", "1")
    monkeypatch.setattr(flce, "_COMPILED", {})
    _, tok = selective_linear_cross_entropy(hid, w, b, y, tw, chunk_tokens=16, return_token_loss=True)
    assert "epilogue" in flce._COMPILED
    torch.testing.assert_close(tok, eager, equal_nan=True)


@pytest.mark.parametrize("fused", [True, False])
def test_selective_loss_passes_the_flag_to_the_loss_it_calls(fused):
    """passes/fuse_loss.selective_loss: the fused op from hidden states, or the logits' loss."""
    from cggr_compile.passes.fuse_loss import FusedLoss, selective_loss

    hid, w, b, y, tw = _inputs(2 * 9, 8, 17)
    head = torch.nn.Linear(8, 17)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    hid, y, tw = hid.reshape(2, 9, 8), y.reshape(2, 9), tw.reshape(2, 9)
    if fused:
        choice, out = FusedLoss("fused", None, head), {"logits": None, "last_hidden_state": hid}
    else:
        from transformers.modeling_outputs import CausalLMOutput

        choice, out = FusedLoss("not fused"), CausalLMOutput(logits=head(hid))
    plain = selective_loss(choice, out, y, tw)
    loss, tok = selective_loss(choice, out, y, tw, return_token_loss=True)
    torch.testing.assert_close(loss, plain)
    assert tok.shape == (2, 9) and not tok.requires_grad
    torch.testing.assert_close(tok.double(), _reference_token_loss(hid.reshape(-1, 8), w, b, y.reshape(-1)).view(2, 9),
                               rtol=1e-4, atol=1e-5)
