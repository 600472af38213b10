"""Tests of the fused router scorer (cggr_compile/ops/fused_scorer.py).

Every check compares against a float64 reference computed from *explicit* logits of the same
(rounded) inputs, so a wrong kernel cannot agree with it by construction.

Three groups:
* the plain-torch path and the custom op on the CPU (run in this process);
* the Triton kernels under ``TRITON_INTERPRET=1``: ``test_triton_interpreter`` re-runs this file in a
  subprocess with that variable set (it must be set before Triton is imported), where only the
  ``test_interp_*`` tests run;
* GPU-only tests (skipped without CUDA): the real sizes, offsets past 2**31 elements, Inductor.
"""

import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

INNER = os.environ.get("CGGR_FUSED_SCORER_INNER") == "1"  # inside the interpreter subprocess
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

from cggr_compile.ops import fused_scorer as fs  # noqa: E402
from cggr_compile.ops.fused_scorer import fused_token_stats  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and fs.HAS_TRITON and not INTERPRET
interp_only = pytest.mark.skipif(not (INNER and INTERPRET and fs.HAS_TRITON), reason="runs in the interpreter subprocess")
host_only = pytest.mark.skipif(INNER, reason="runs in the main pytest process")
gpu_only = pytest.mark.skipif(not HAS_CUDA or INNER, reason="needs CUDA and Triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGN = -100


# ----------------------------------------------------------------------------------------------
# reference and inputs
# ----------------------------------------------------------------------------------------------
def reference(hidden, weight, bias, labels, softcap):
    """float64 statistics from explicit logits (the same rounded inputs, upcast exactly)."""
    h64 = hidden.double()
    step = max(1, (1 << 27) // weight.shape[1])  # upcast the weight in slices (huge heads)
    z = torch.cat([h64 @ weight[v:v + step].double().T for v in range(0, weight.shape[0], step)], dim=1)
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=1)
    logp = z - lse[:, None]
    p = logp.exp()
    ent = -(p * logp).sum(dim=1)
    if z.shape[1] >= 2:
        top = torch.topk(p, 2, dim=1).values
        p1, p2 = top[:, 0], top[:, 1]
    else:
        p1, p2 = p[:, 0], torch.zeros_like(lse)
    safe = labels.clamp(min=0)
    nll = -logp.gather(1, safe[:, None])[:, 0]
    nll = torch.where(labels == IGN, torch.zeros_like(nll), nll)
    return lse, ent, p1, p2, nll


def reference_chunked(hidden, weight, bias, labels, softcap, max_elems=1 << 26):
    """`reference` over token chunks (float64 on the tensors' device): for the big GPU cases."""
    N, V = hidden.shape[0], weight.shape[0]
    step = max(1, max_elems // V)
    parts = [reference(hidden[i:i + step], weight, bias, labels[i:i + step], softcap) for i in range(0, N, step)]
    return tuple(torch.cat([p[k] for p in parts]) for k in range(5))


def make_case(N, V, H, dtype, bias=False, softcap=None, seed=0, tie=False, scale=3.0, device="cpu", tie_gap=None):
    """Random hidden/weight/bias/labels, rounded to ``dtype``; ~1/3 of labels are -100.

    ``tie``: two identical weight rows (and bias entries) that dominate every token's logits, rows
    ``V // 3`` and ``V // 3 + tie_gap`` (default: the last row; 1 puts both in one vocabulary tile). The
    inputs are then quantised (hidden to multiples of 1/4, weight and bias to multiples of 1/8) so
    that every logit is exact in fp32 whatever the summation order: the top two logits are then
    bit-identical on every path (BLAS, tensor cores, float64), not merely equal in exact arithmetic.
    """
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (scale / math.sqrt(H))
    b = torch.randn(V, generator=g) if bias else None
    if tie and V >= 2:
        sgn = torch.randint(0, 2, (H,), generator=g).float() * 2 - 1
        h = torch.round(h * 4) / 4 + 3.0 * sgn
        w = torch.round(w / scale * 8) / 8
        r1 = V // 3
        r2 = V - 1 if tie_gap is None else r1 + tie_gap
        w[r1] = sgn / 4  # logit 0.75 * H + O(sqrt(H) / 4): far above the others (std ~ 3)
        w[r2] = w[r1]
        if b is not None:
            b = torch.round(b * 8) / 8
            b[r2] = b[r1]
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.33] = IGN
    h, w = h.to(dtype).to(device), w.to(dtype).to(device)
    if b is not None:
        b = b.to(dtype).to(device)
    return h, w, b, labels.to(device), softcap


def check(out, ref, labels, rtol, atol, patol=None):
    names = ["lse", "entropy", "p1", "p2", "nll"]
    patol = atol if patol is None else patol
    for name, o, r in zip(names, out, ref):
        assert o.dtype == torch.float32, name
        assert o.shape == r.shape, (name, o.shape, r.shape)
        assert torch.isfinite(o).all(), f"{name}: non-finite (unwritten?) elements at {torch.nonzero(~torch.isfinite(o)).flatten()[:8].tolist()}"
        if name in ("p1", "p2"):
            torch.testing.assert_close(o.double(), r, rtol=0, atol=patol, msg=lambda m: f"{name}: {m}")
        else:
            torch.testing.assert_close(o.double(), r, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    lse, ent, p1, p2, nll = out
    assert (p1 >= p2).all()
    ign = labels == IGN
    assert (nll[ign] == 0.0).all(), "nll must be exactly 0 at label -100"


def _combo(i):
    """Cycle through (bias, softcap) so that every size meets every combination somewhere."""
    return [(False, None), (True, None), (False, 4.0), (True, 30.0)][i % 4]


# ----------------------------------------------------------------------------------------------
# CPU: plain-torch path and the op
# ----------------------------------------------------------------------------------------------
CPU_TOL = dict(rtol=1e-4, atol=1e-5)  # every CPU path multiplies in fp32 (exact for bf16/fp16 inputs)

TORCH_SIZES = [(n, v) for v in (1, 7, 33, 1001, 32001) for n in (1, 7, 64)]


@host_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V", TORCH_SIZES)
def test_torch_path_matches_reference(N, V, dtype):
    i = TORCH_SIZES.index((N, V)) + DTYPES.index(dtype)
    bias, cap = _combo(i)
    h, w, b, lab, cap = make_case(N, V, 48, dtype, bias, cap, seed=i)
    ref = reference(h, w, b, lab, cap)
    # small chunks so that the online merge over token and vocabulary chunks is exercised
    out = fs._torch_token_stats(h, w, b, lab, cap, chunk_tokens=5, chunk_vocab=max(16, V // 5), poison=True)
    check(out, ref, lab, **CPU_TOL)


@host_only
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_cpu_matches_reference(dtype, softcap, bias):
    h, w, b, lab, cap = make_case(37, 1001, 64, dtype, bias, softcap, seed=7)
    out = fused_token_stats(h, w, b, lab, softcap=cap)
    check(out, reference(h, w, b, lab, cap), lab, **CPU_TOL)


@host_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["torch", "op"])
def test_exact_tie_at_top(path, dtype):
    for bias, gap in [(False, None), (True, None), (False, 1), (True, 1)]:
        h, w, b, lab, cap = make_case(13, 257, 32, dtype, bias, None, seed=3, tie=True, tie_gap=gap)
        ref = reference(h, w, b, lab, cap)
        assert torch.equal(ref[2], ref[3])  # the case really has a tie at the top
        if path == "torch":
            out = fs._torch_token_stats(h, w, b, lab, cap, chunk_vocab=64)
        else:
            out = fused_token_stats(h, w, b, lab)
        check(out, ref, lab, **CPU_TOL)
        assert torch.equal(out[2], out[3]), "an exact tie must give p1 == p2"


@host_only
def test_peaked_distributions_are_stable():
    """Large logits (nearly one-hot softmax): entropy must not cancel catastrophically."""
    h, w, b, lab, cap = make_case(64, 513, 64, torch.float32, scale=60.0, seed=11)
    ref = reference(h, w, b, lab, cap)
    assert ref[1].min() < 1e-3  # really peaked somewhere
    out = fs._torch_token_stats(h, w, b, lab, cap, chunk_vocab=100)
    check(out, ref, lab, rtol=1e-4, atol=2e-5)
    check(fused_token_stats(h, w, b, lab), ref, lab, rtol=1e-4, atol=2e-5)


@host_only
def test_op_shapes_labels_and_dtypes():
    B, T, H, V = 3, 5, 32, 101
    h, w, b, lab, _ = make_case(B * T, V, H, torch.bfloat16, bias=True, seed=5)
    ref = reference(h, w, b, lab, None)
    # [B, T, H] hidden, int32 labels: outputs shaped [B, T]
    out = fused_token_stats(h.view(B, T, H), w, b, lab.view(B, T).int())
    assert all(o.shape == (B, T) for o in out)
    check([o.reshape(-1) for o in out], ref, lab, **CPU_TOL)
    # no labels: nll is all zeros, the rest unchanged
    out = fused_token_stats(h, w, b, None)
    assert torch.equal(out[4], torch.zeros(B * T))
    torch.testing.assert_close(out[1].double(), ref[1], **CPU_TOL)
    # all labels ignored
    out = fused_token_stats(h, w, b, torch.full((B * T,), IGN))
    assert torch.equal(out[4], torch.zeros(B * T))
    # hidden in float32 with a bf16 head: hidden is cast to the head's dtype
    out = fused_token_stats(h.float(), w, b, lab)
    check(out, ref, lab, **CPU_TOL)
    # non-contiguous hidden rows
    wide = torch.zeros(B * T, 2 * H, dtype=h.dtype)
    wide[:, ::2] = h
    check(fused_token_stats(wide[:, ::2], w, b, lab), ref, lab, **CPU_TOL)
    # zero tokens
    out = fused_token_stats(h[:0], w, b, lab[:0])
    assert all(o.shape == (0,) for o in out)


@host_only
def test_out_of_range_label_gives_nan_not_a_crash():
    h, w, b, lab, _ = make_case(4, 9, 16, torch.float32, seed=1)
    lab = torch.tensor([0, 9, -5, IGN])
    out = fused_token_stats(h, w, b, lab)
    nll = out[4]
    assert torch.isfinite(nll[0]) and nll[0] >= 0
    assert torch.isnan(nll[1]) and torch.isnan(nll[2])
    assert nll[3] == 0.0


@host_only
def test_bad_inputs_raise_clear_errors():
    h, w, b, lab, _ = make_case(4, 9, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="last dim"):
        fused_token_stats(h[:, :8], w, None, lab)
    with pytest.raises(ValueError, match="weight must be"):
        fused_token_stats(h, w[0], None, lab)
    with pytest.raises(ValueError, match="bias"):
        fused_token_stats(h, w, torch.zeros(8), lab)
    with pytest.raises(ValueError, match="labels shape"):
        fused_token_stats(h, w, None, lab[:3])
    with pytest.raises(TypeError, match="labels"):
        fused_token_stats(h, w, None, lab.float())
    with pytest.raises(TypeError, match="dtype"):
        fused_token_stats(h.double(), w.double(), None, lab)
    with pytest.raises(ValueError, match="softcap"):
        fused_token_stats(h, w, None, lab, softcap=0.0)


@host_only
def test_runs_without_grad():
    h, w, b, lab, _ = make_case(6, 33, 16, torch.float32, bias=True, seed=2)
    ref = reference(h, w, b, lab, None)
    hg, wg, bg = (t.clone().requires_grad_() for t in (h, w, b))
    out = fused_token_stats(hg, wg, bg, lab)
    assert not any(o.requires_grad for o in out)
    check(out, ref, lab, **CPU_TOL)
    with torch.no_grad():
        check(fused_token_stats(hg, wg, bg, lab), ref, lab, **CPU_TOL)


def _scores(h, w, lab):
    lse, ent, p1, p2, nll = fused_token_stats(h, w, None, lab, softcap=8.0)
    return ent + (1.0 - (p1 - p2)) + nll


@host_only
def test_op_is_traceable():
    from torch.fx.experimental.proxy_tensor import make_fx

    h, w, _, lab, _ = make_case(2 * 5, 33, 16, torch.float32, seed=4)
    h, lab = h.view(2, 5, 16), lab.view(2, 5)
    eager = _scores(h, w, lab)
    for mode in ("real", "fake"):
        gm = make_fx(_scores, tracing_mode=mode)(h, w, lab)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert torch.ops.cggr.fused_token_stats.default in targets, gm.code
        torch.testing.assert_close(gm(h, w, lab), eager)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(_scores, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(h, w, lab), eager)
    assert any("cggr.fused_token_stats" in g.code for g in graphs)
    torch._dynamo.reset()
    compiled = torch.compile(_scores, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(h, w, lab), eager)


def _same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b)), [(x - y).abs().max().item() for x, y in zip(a, b)]


@host_only
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 5.0)])
def test_autocast_rule_casts_like_the_explicit_cast(bias, softcap, amp):
    """Under autocast the op takes its float inputs in the region's dtype (the op's autocast rule),
    exactly as the explicit casts before it did, and its own float32 math is not autocast."""
    from torch.fx.experimental.proxy_tensor import make_fx

    h, w, b, lab, cap = make_case(12, 77, 24, torch.float32, bias=bias, softcap=softcap, seed=61)
    hc, wc = h.to(amp), w.to(amp)
    bc = b.to(amp) if b is not None else None
    cast = fused_token_stats(hc, wc, bc, lab, cap)  # the explicit cast, outside autocast
    plain = fused_token_stats(h, w, b, lab, cap)
    with torch.autocast("cpu", dtype=amp):
        _same(fused_token_stats(h, w, b, lab, cap), cast)
        _same(torch.ops.cggr.fused_token_stats.default(h, w, b, lab, cap), cast)
        _same(fused_token_stats(hc, wc, bc, lab, cap), cast)  # explicit cast and the rule: the same
        gm = make_fx(lambda h, w, b, l: torch.ops.cggr.fused_token_stats.default(h, w, b, l, cap))(h, w, b, lab)
    ops = [n for n in gm.graph.nodes if n.target == torch.ops.cggr.fused_token_stats.default]
    assert len(ops) == 1 and all(a.meta["val"].dtype == amp for a in ops[0].args[:3] if a is not None), gm.code
    _same(gm(h, w, b, lab), cast)
    with torch.autocast("cpu", dtype=amp), torch.autocast("cpu", enabled=False):  # autocast off: no cast
        _same(fused_token_stats(h, w, b, lab, cap), plain)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, b, l: fused_token_stats(h, w, b, l, cap), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=amp):
        _same(compiled(h, w, b, lab), cast)
    torch._dynamo.reset()


@host_only
def test_workspace_and_split_sizing():
    # the split cap shrinks as tokens grow; the workspace stays O(N * splits)
    assert fs._max_splits(1, 128256) == 128
    assert fs._max_splits(16384, 128256) == 8
    assert fs._max_splits(65536, 128256) == 2
    assert fs._max_splits(1, 7) == 1
    grid = fs._partial_grid(1024, 49152, fs._max_splits(1024, 49152))
    tb, splits = grid({"BLOCK_N": 128, "BLOCK_V": 128, "SPLIT_TARGET": 264})
    assert tb == 8 and splits == 32
    tb, splits = fs._partial_grid(16384, 49152, fs._max_splits(16384, 49152))(
        {"BLOCK_N": 128, "BLOCK_V": 128, "SPLIT_TARGET": 264}
    )
    assert tb == 128 and splits == 3


_NO_TRITON_SCRIPT = """
import sys
sys.modules["triton"] = None  # import triton now fails
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from cggr_compile.ops import fused_scorer as fs
assert not fs.HAS_TRITON and not fs.HAS_TRITON_OP
g = torch.Generator().manual_seed(0)
h, w = torch.randn(5, 16, generator=g), torch.randn(33, 16, generator=g)
lab = torch.tensor([0, 32, -100, 7, 1])
out = fs.fused_token_stats(h, w, None, lab)
ref = fs._torch_token_stats(h, w, None, lab, None)
assert all(torch.equal(a, b) for a, b in zip(out, ref))
z = (h.double() @ w.double().T)
torch.testing.assert_close(out[0].double(), torch.logsumexp(z, 1), rtol=1e-5, atol=1e-5)
gm = make_fx(lambda h, w, l: fs.fused_token_stats(h, w, None, l)[1])(h, w, lab)
assert "cggr.fused_token_stats" in gm.code
print("ok")
"""


@host_only
def test_without_triton_the_op_still_exists():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TRITON_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess)
# ----------------------------------------------------------------------------------------------
@host_only
@pytest.mark.skipif(not fs.HAS_TRITON, reason="triton not installed")
def test_triton_interpreter():
    """Runs this file's ``test_interp_*`` tests with TRITON_INTERPRET=1 in a fresh interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", CGGR_FUSED_SCORER_INNER="1")
    env.pop("CGGR_FUSED_SCORER_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "test_interp_"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted Triton tests failed ({time.time() - t0:.0f}s):\n{tail}"
    ran = re.search(r"(\d+) passed", proc.stdout)
    assert ran and int(ran.group(1)) >= 40, f"the interpreted tests did not run:\n{tail}"


INTERP_SIZES = [(n, v) for v in (1, 7, 33, 1001) for n in (1, 7, 64)]


@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V", INTERP_SIZES)
def test_interp_kernel_matches_reference(N, V, dtype):
    i = INTERP_SIZES.index((N, V)) + DTYPES.index(dtype)
    bias, cap = _combo(i)
    h, w, b, lab, cap = make_case(N, V, 40, dtype, bias, cap, seed=100 + i)  # H=40: a partial K block
    out = fs._launch_triton(h, w, b, lab, cap, poison=True)
    check(out, reference(h, w, b, lab, cap), lab, **CPU_TOL)


@interp_only
@pytest.mark.parametrize("N,dtype", [(3, torch.bfloat16), (3, torch.float16), (64, torch.float32)], ids=str)
def test_interp_vocab_32001(N, dtype):
    h, w, b, lab, cap = make_case(N, 32001, 32, dtype, bias=True, softcap=30.0 if N == 64 else None, seed=9)
    cfg = {"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_K": 32, "SPLIT_TARGET": 16}
    out = fs._launch_triton(h, w, b, lab, cap, config=cfg, poison=True)
    check(out, reference(h, w, b, lab, cap), lab, **CPU_TOL)


@interp_only
@pytest.mark.parametrize("top2_tuple", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interp_tie_and_both_top2_reductions(dtype, top2_tuple):
    # small tiles so the element-by-element tuple reduction stays quick in the interpreter
    cfg = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "SPLIT_TARGET": 2}
    # ties across tiles (rows 23 and 69) and inside one tile (rows 23 and 24)
    for tie, gap, bias, cap in [(True, None, False, None), (True, 1, True, 6.0), (True, 1, False, None), (False, None, True, None)]:
        h, w, b, lab, cap = make_case(7, 70, 24, dtype, bias, cap, seed=21, tie=tie, tie_gap=gap)
        ref = reference(h, w, b, lab, cap)
        out = fs._launch_triton(h, w, b, lab, cap, config=cfg, poison=True, top2_tuple=top2_tuple)
        check(out, ref, lab, **CPU_TOL)
        if tie:
            assert torch.equal(ref[2], ref[3])
            assert torch.equal(out[2], out[3]), "an exact tie must give p1 == p2"


@interp_only
def test_interp_split_layouts():
    """Several tiles per split, several token blocks, and an empty trailing split."""
    # V=1001, BLOCK_V=128 -> 8 tiles; N=64, BLOCK_N=16 -> 4 token blocks; 2 splits of 4 tiles
    h, w, b, lab, cap = make_case(64, 1001, 32, torch.float32, bias=True, softcap=20.0, seed=31)
    cfg = {"BLOCK_N": 16, "BLOCK_V": 128, "BLOCK_K": 32, "SPLIT_TARGET": 8}
    assert fs._partial_grid(64, 1001, fs._max_splits(64, 1001))(cfg) == (4, 2)
    check(fs._launch_triton(h, w, b, lab, cap, config=cfg, poison=True), reference(h, w, b, lab, cap), lab, **CPU_TOL)
    # V=319, BLOCK_V=64 -> 5 tiles over 4 splits of 2 tiles: the 4th split is empty
    h, w, b, lab, cap = make_case(7, 319, 32, torch.bfloat16, seed=32)
    cfg = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_K": 32, "SPLIT_TARGET": 4}
    assert fs._partial_grid(7, 319, fs._max_splits(7, 319))(cfg) == (1, 4)
    check(fs._launch_triton(h, w, b, lab, cap, config=cfg, poison=True), reference(h, w, b, lab, cap), lab, **CPU_TOL)


@interp_only
def test_interp_strided_hidden_and_the_op(monkeypatch):
    h, w, b, lab, cap = make_case(9, 77, 24, torch.float16, bias=True, seed=41)
    ref = reference(h, w, b, lab, cap)
    wide = torch.zeros(9, 3 * 24, dtype=h.dtype)
    wide[:, 24:48] = h
    check(fs._launch_triton(wide[:, 24:48], w, b, lab, cap, poison=True), ref, lab, **CPU_TOL)
    # the public op, forced onto the Triton path on the CPU
    monkeypatch.setattr(fs, "_BACKEND", "triton")
    check(fused_token_stats(h, w, b, lab), ref, lab, **CPU_TOL)


@interp_only
def test_interp_autocast_rule(monkeypatch):
    h, w, b, lab, cap = make_case(9, 77, 24, torch.float32, bias=True, softcap=5.0, seed=42)
    monkeypatch.setattr(fs, "_BACKEND", "triton")
    cast = fused_token_stats(h.bfloat16(), w.bfloat16(), b.bfloat16(), lab, cap)
    check(cast, reference(h.bfloat16(), w.bfloat16(), b.bfloat16(), lab, cap), lab, **CPU_TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _same(fused_token_stats(h, w, b, lab, cap), cast)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
GPU_TOL_16 = dict(rtol=2e-3, atol=2e-3)  # tensor-core products, fp32 accumulation
GPU_TOL_32 = dict(rtol=1e-4, atol=2e-5)  # IEEE fp32 dot


def _gpu_tol(dtype):
    return GPU_TOL_32 if dtype == torch.float32 else GPU_TOL_16


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V", TORCH_SIZES)
def test_gpu_small_sizes(N, V, dtype):
    i = TORCH_SIZES.index((N, V)) + DTYPES.index(dtype)
    bias, cap = _combo(i)
    h, w, b, lab, cap = make_case(N, V, 96, dtype, bias, cap, seed=200 + i, device="cuda")
    # one fixed real config (autotuning every small shape would compile ~70 kernel variants)
    cfg = dict((fs._CONFIGS_32 if dtype == torch.float32 else fs._CONFIGS_16)[2].all_kwargs())
    out = fs._launch_triton(h, w, b, lab, cap, config=cfg, poison=True)
    check(out, reference(h, w, b, lab, cap), lab, **_gpu_tol(dtype))


@gpu_only
@pytest.mark.parametrize("N", [4096, 65536])
@pytest.mark.parametrize("V", [32001, 49152, 50257, 128256])
def test_gpu_vocab_sizes(V, N):
    i = [32001, 49152, 50257, 128256].index(V) + (N == 65536)
    bias, cap = _combo(i)
    h, w, b, lab, cap = make_case(N, V, 256, torch.bfloat16, bias, cap, seed=300 + i, device="cuda")
    out = fused_token_stats(h, w, b, lab, softcap=cap)
    check(out, reference_chunked(h, w, b, lab, cap), lab, **GPU_TOL_16)


@gpu_only
@pytest.mark.parametrize(
    "N,V,H,dtype",
    [
        (16384, 49152, 576, torch.bfloat16),
        (4096, 128256, 2048, torch.bfloat16),
        (1024, 49152, 960, torch.float16),
        (4096, 32001, 512, torch.float32),
    ],
)
def test_gpu_real_heads(N, V, H, dtype):
    for bias, cap in [(False, None), (True, 30.0)]:
        h, w, b, lab, cap = make_case(N, V, H, dtype, bias, cap, seed=H + N, device="cuda")
        out = fused_token_stats(h, w, b, lab, softcap=cap)
        check(out, reference_chunked(h, w, b, lab, cap), lab, **_gpu_tol(dtype))


@gpu_only
@pytest.mark.parametrize("which", ["weight", "hidden"])
def test_gpu_offsets_past_2_31(which):
    free = torch.cuda.mem_get_info()[0]
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    H = 8200
    if which == "weight":  # V * H > 2**31 elements
        N, V = 64, 262144 + 7
    else:  # N * H > 2**31 elements
        N, V = 262144 + 5, 1000
    assert (V if which == "weight" else N) * H > 2**31
    g = torch.Generator(device="cuda").manual_seed(5)
    h = torch.randn(N, H, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(V, H, device="cuda", generator=g) * (3.0 / math.sqrt(H))).to(torch.bfloat16)
    lab = torch.randint(0, V, (N,), device="cuda", generator=g)
    lab[::3] = IGN
    if which == "weight":
        lab[-1] = V - 1  # a label in the far end of the weight
    out = fused_token_stats(h, w, None, lab)
    if which == "hidden":  # compare the far end of the token range (and a sample of the rest)
        idx = torch.cat([torch.arange(0, 512, device="cuda"), torch.arange(N - 4096, N, device="cuda")])
    else:
        idx = torch.arange(N, device="cuda")
    ref = reference_chunked(h[idx], w, None, lab[idx], None, max_elems=1 << 24)
    check([o[idx] for o in out], ref, lab[idx], **GPU_TOL_16)


@gpu_only
def test_gpu_tie_and_poison():
    for dtype, gap in [(d, g) for d in DTYPES for g in (None, 1)]:
        h, w, b, lab, cap = make_case(300, 4099, 128, dtype, bias=True, seed=8, tie=True, tie_gap=gap, device="cuda")
        ref = reference(h, w, b, lab, cap)
        out = fs._launch_triton(h, w, b, lab, cap, poison=True)
        check(out, ref, lab, **_gpu_tol(dtype))
        assert torch.equal(out[2], out[3])


@gpu_only
def test_gpu_inductor_compiles_the_kernels_into_the_graph():
    from torch._inductor.utils import run_and_get_code

    h, w, _, lab, _ = make_case(2 * 512, 32001, 256, torch.bfloat16, seed=12, device="cuda")
    h, lab = h.view(2, 512, 256), lab.view(2, 512)
    eager = _scores(h, w, lab)
    torch._dynamo.reset()
    compiled = torch.compile(_scores, fullgraph=True)
    out, codes = run_and_get_code(compiled, h, w, lab)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    code = "\n".join(codes)
    assert "_scorer_partial_kernel" in code and "_scorer_combine_kernel" in code
