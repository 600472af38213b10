"""Triton kernels of the fused router scorer (the op and its wrapper: :mod:`.fused_scorer`).

A split-vocabulary kernel. Grid = (token blocks, vocabulary splits). Each program streams its
vocabulary range in ``BLOCK_V`` tiles, computes the ``BLOCK_N x BLOCK_V`` logit tile with ``tl.dot``
(fp32 accumulation; bf16/fp16 operands on the tensor cores, fp32 operands in IEEE fp32) and folds it
into online statistics: running max ``m``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) * (z - m)``
(the entropy term, kept relative to ``m`` so that it does not cancel), and the running top-2 logits.
It writes those partials to an ``O(N * splits)`` float32 workspace; a small combine kernel merges the
splits and computes the label logit by a gathered dot product (``hidden[n] . weight[label[n]]``), so
the hot loop carries no label work. :func:`_launch_triton` allocates and launches both; the op passes
``torch.library.wrap_triton`` so that Inductor sees the kernels inside a compiled graph.
"""

import functools
import math
import os
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..scoring import IGNORE_INDEX

# Finite "minus infinity" for padding columns and empty splits: keeps 0 * (-inf) NaNs away, and
# stays finite when scaled by log2(e) (the kernel works in base 2).
_NEG = -1.0e38

# TRITON_INTERPRET=1 runs the kernels on the CPU (tests); some launch choices differ there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:  # Triton is optional: without it only the torch path exists.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False


# ----------------------------------------------------------------------------------------------
# Sizing heuristics (host side; plain Python on ints, so they trace with static shapes)
# ----------------------------------------------------------------------------------------------
def _cdiv(a, b):
    return (a + b - 1) // b


def _n_bucket(n) -> int:
    """Coarse token-count class: the autotuning key and the workspace's split cap use it."""
    if n <= 64:
        return 0
    if n <= 512:
        return 1
    if n <= 4096:
        return 2
    if n <= 16384:
        return 3
    return 4


# Most vocabulary splits a call may use, per token-count class. Splitting exists so that a few
# token blocks still fill the GPU; with many tokens it only re-reads the hidden states.
_SPLIT_CAP = (128, 64, 32, 8, 2)


def _max_splits(n, v) -> int:
    return max(1, min(_SPLIT_CAP[_n_bucket(n)], _cdiv(v, 64)))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    _NEG_C = tl.constexpr(_NEG)
    _LOG2E_C = tl.constexpr(1.4426950408889634)
    _LN2_C = tl.constexpr(0.6931471805599453)
    _IGNORE_C = tl.constexpr(IGNORE_INDEX)

    if _INTERPRET:

        def _bound(x):
            """A runtime loop bound as a Python int, for the interpreter only.

            Triton's interpreter runs ``for i in range(lo, hi)`` as Python's ``range``, which asks
            the scalar tensors ``lo`` / ``hi`` for ``__index__``; their data is a one-element 1-d
            NumPy array (kernel arguments, ``program_id``, ``num_programs``, scalar loads), and
            Triton 3.6's ``__index__`` is ``int(data)``, which NumPy >= 2.4 refuses ("only
            0-dimensional arrays can be converted to Python scalars"; Triton >= 3.7 squeezes
            first). Every loop with a runtime bound failed there, whatever its body.
            """
            data = getattr(getattr(x, "handle", None), "data", None)
            return int(data.reshape(-1)[0]) if data is not None else x

    else:

        @triton.jit
        def _bound(x):
            # Compiled kernels: the identity (inlined), so their loops are exactly ``range(lo, hi)``.
            return x

    @triton.jit
    def _top2_combine(a1, a2, b1, b2):
        # top-2 of the multiset {a1, a2} u {b1, b2}, given a1 >= a2 and b1 >= b2.
        hi = tl.maximum(a1, b1)
        lo = tl.minimum(a1, b1)
        return hi, tl.maximum(lo, tl.maximum(a2, b2))

    @triton.jit
    def _softcap(z, cap):
        # cap * tanh(z / cap); tanh through exp(-2|x|), which never overflows. Inductor passes a
        # Python float argument as fp64 (torch >= 2.10), which would make the loop-carried
        # statistics fp64 and fail to compile: compute in fp32 whatever the caller's type.
        cap = tl.cast(cap, tl.float32)
        x = z / cap
        e = tl.exp(-2.0 * tl.abs(x))
        th = (1.0 - e) / (1.0 + e)
        return cap * tl.where(x >= 0, th, -th)

    @triton.jit
    def _scorer_partial_kernel(
        x_ptr, w_ptr, b_ptr, ws_ptr, cnt_ptr,
        N, V, H, N_BUCKET,
        stride_xn, stride_xk, stride_wv, stride_wk,
        softcap,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        FP32_DOT: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_TARGET: tl.constexpr,
        TOP2_TUPLE: tl.constexpr,
    ):
        """Partial statistics of one (token block, vocabulary split).

        Workspace layout: ws[(split * 5 + field) * N + n], fields (m, s, t, z1, z2), float32.
        ``SPLIT_TARGET`` only shapes the grid (see ``_partial_grid``); the split count is
        ``tl.num_programs(1)``, which program (0, 0) records in ``cnt_ptr`` for the combine kernel.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        nsplit = tl.num_programs(1)
        if (pid_n == 0) & (pid_s == 0):
            tl.store(cnt_ptr, nsplit)

        n_tiles = tl.cdiv(V, BLOCK_V)
        tiles_per_split = tl.cdiv(n_tiles, nsplit)
        t_lo = pid_s * tiles_per_split
        t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)

        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs_n[:, None] * stride_xn

        m = tl.full([BLOCK_N], _NEG_C, tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        t = tl.zeros([BLOCK_N], tl.float32)
        z1 = tl.full([BLOCK_N], _NEG_C, tl.float32)
        z2 = tl.full([BLOCK_N], _NEG_C, tl.float32)

        for tile in range(_bound(t_lo), _bound(t_hi)):
            offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)  # tile * BLOCK_V < V + BLOCK_V
            mask_v = offs_v < V
            w_rows = w_ptr + offs_v[:, None] * stride_wv
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, _bound(H), BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < H
                xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                wt = tl.load(w_rows + kk[None, :] * stride_wk, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
                if UPCAST_DOT:  # the interpreter multiplies bf16 as raw uint16 bits: go through fp32
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                if FP32_DOT or UPCAST_DOT:
                    acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(wt), acc)
            z = acc
            if HAS_BIAS:
                bt = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
                if not HAS_SOFTCAP:  # fold the column mask into the bias row (per column, not per element)
                    bt = tl.where(mask_v, bt, _NEG_C)
                z = z + bt[None, :]
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            if (not HAS_BIAS) or HAS_SOFTCAP:
                if tile * BLOCK_V + BLOCK_V > V:  # only the vocabulary's last tile has padding columns
                    z = tl.where(mask_v[None, :], z, _NEG_C)

            # top-2 logits of the tile; an exact tie at the top gives t2 == t1.
            if TOP2_TUPLE:  # one pass, 3 FMNMX/element in SASS; ~12% fewer epilogue instructions
                t1, t2 = tl.reduce((z, tl.full([BLOCK_N, BLOCK_V], _NEG_C, tl.float32)), 1, _top2_combine)
            else:  # built-in reductions only
                t1 = tl.max(z, axis=1)
                at_top = z == t1[:, None]
                n_top = tl.sum(at_top.to(tl.int32), axis=1)
                t2 = tl.max(tl.where(at_top, _NEG_C, z), axis=1)
                t2 = tl.where(n_top > 1, t1, t2)
            z1, z2 = _top2_combine(z1, z2, t1, t2)
            # Online softmax in base 2: m is the running max in log2 units, d = (z - max) * log2(e)
            # is one FMA, p = 2^d one MUFU.EX2. t = sum p * d: rebase the old part to m_new, add the tile.
            m_new = tl.maximum(m, t1 * _LOG2E_C)
            alpha = tl.exp2(m - m_new)
            d = tl.fma(z, _LOG2E_C, -m_new[:, None])
            p = tl.exp2(d)
            t = alpha * (t + (m - m_new) * s) + tl.sum(p * d, axis=1)
            s = alpha * s + tl.sum(p, axis=1)
            m = m_new

        # back to natural-log units for the workspace
        m = m * _LN2_C
        t = t * _LN2_C
        base = ws_ptr + (pid_s.to(tl.int64) * 5) * N + offs_n
        tl.store(base, m, mask=mask_n)
        tl.store(base + N, s, mask=mask_n)
        tl.store(base + 2 * N, t, mask=mask_n)
        tl.store(base + 3 * N, z1, mask=mask_n)
        tl.store(base + 4 * N, z2, mask=mask_n)

    @triton.jit
    def _scorer_combine_kernel(
        ws_ptr, cnt_ptr, x_ptr, w_ptr, b_ptr, lab_ptr,
        lse_ptr, ent_ptr, p1_ptr, p2_ptr, nll_ptr,
        N, V, H,
        stride_xn, stride_xk, stride_wv, stride_wk,
        softcap,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < N
        nsplit = tl.load(cnt_ptr)

        # pass 1: global max
        M = tl.full([BLOCK], _NEG_C, tl.float32)
        base = ws_ptr + offs  # 64-bit pointers; advanced by one split (5 * N) per iteration
        for sp in range(0, _bound(nsplit)):
            ms = tl.load(base, mask=mask, other=_NEG_C)
            M = tl.maximum(M, ms)
            base += 5 * N
        # pass 2: rescaled sums and top-2
        S = tl.zeros([BLOCK], tl.float32)
        T = tl.zeros([BLOCK], tl.float32)
        Z1 = tl.full([BLOCK], _NEG_C, tl.float32)
        Z2 = tl.full([BLOCK], _NEG_C, tl.float32)
        base = ws_ptr + offs
        for sp in range(0, _bound(nsplit)):
            ms = tl.load(base, mask=mask, other=_NEG_C)
            ss = tl.load(base + N, mask=mask, other=0.0)
            ts = tl.load(base + 2 * N, mask=mask, other=0.0)
            a1 = tl.load(base + 3 * N, mask=mask, other=_NEG_C)
            a2 = tl.load(base + 4 * N, mask=mask, other=_NEG_C)
            alive = ss > 0.0
            e = tl.where(alive, tl.exp(ms - M), 0.0)
            S += e * ss
            T += tl.where(alive, e * (ts + (ms - M) * ss), 0.0)
            Z1, Z2 = _top2_combine(Z1, Z2, a1, a2)
            base += 5 * N

        S = tl.where(mask, S, 1.0)
        log_s = tl.log(S)
        lse = M + log_s
        ent = tl.maximum(log_s - T / S, 0.0)
        p1 = tl.minimum(tl.exp(Z1 - lse), 1.0)
        p2 = tl.minimum(tl.exp(Z2 - lse), 1.0)

        # label logit: hidden[n] . weight[label[n]] (+ bias), gathered, fp32 accumulation
        lab = tl.load(lab_ptr + offs, mask=mask, other=_IGNORE_C)
        in_range = (lab >= 0) & (lab < V)
        lab_c = tl.where(in_range, lab, 0).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs[:, None] * stride_xn
        w_rows = w_ptr + lab_c[:, None] * stride_wv
        acc = tl.zeros([BLOCK, BLOCK_K], tl.float32)
        gmask = mask & in_range
        for k0 in range(0, _bound(H), BLOCK_K):
            kk = k0 + offs_k
            mk = gmask[:, None] & (kk < H)[None, :]
            xv = tl.load(x_rows + kk[None, :] * stride_xk, mask=mk, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + kk[None, :] * stride_wk, mask=mk, other=0.0).to(tl.float32)
            acc += xv * wv
        zl = tl.sum(acc, axis=1)
        if HAS_BIAS:
            zl += tl.load(b_ptr + lab_c, mask=gmask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            zl = _softcap(zl, softcap)
        nll = tl.maximum(lse - zl, 0.0)
        nll = tl.where(in_range, nll, float("nan"))
        nll = tl.where(lab == _IGNORE_C, 0.0, nll)

        tl.store(lse_ptr + offs, lse, mask=mask)
        tl.store(ent_ptr + offs, ent, mask=mask)
        tl.store(p1_ptr + offs, p1, mask=mask)
        tl.store(p2_ptr + offs, p2, mask=mask)
        tl.store(nll_ptr + offs, nll, mask=mask)

    def _cfg(bn, bv, bk, warps, stages, split_target):
        return triton.Config(
            {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "SPLIT_TARGET": split_target},
            num_warps=warps,
            num_stages=stages,
        )

    # 16-bit operands (tensor cores, wgmma on Hopper). SPLIT_TARGET is the number of programs a call
    # aims for when it has few token blocks (132 SMs on an H100/H200). Every config below compiles for
    # sm_90 without register spills (ptxas via triton.compile(target=GPUTarget("cuda", 90, 32)), no
    # GPU needed): 8-warp 128x128 tiles use ~250 registers/thread (1 CTA/SM); 4-warp 64x128 and
    # 128x64 tiles ~250 (2 CTAs/SM, so one CTA's softmax epilogue overlaps the other's MMAs); 64x64
    # ~170 (3 CTAs/SM). 128x256 and 256x128 tiles spill.
    _CONFIGS_16 = [
        _cfg(128, 128, 64, 8, 3, 264),
        _cfg(128, 128, 64, 8, 4, 528),
        _cfg(64, 128, 64, 4, 4, 528),
        _cfg(128, 64, 64, 4, 4, 528),
        _cfg(64, 256, 64, 8, 3, 264),
        _cfg(64, 64, 64, 4, 4, 792),
    ]
    # float32 operands (IEEE fp32 FMA path: smaller tiles, shallower pipelines).
    _CONFIGS_32 = [
        _cfg(64, 64, 32, 4, 2, 528),
        _cfg(32, 64, 32, 4, 2, 528),
        _cfg(64, 128, 32, 8, 2, 264),
    ]
    _AUTOTUNE_KEY = ["N_BUCKET", "V", "H"]

    @functools.lru_cache(maxsize=None)
    def _autotuned_partial(fp32: bool) -> Any:
        """The autotuned partial kernel, built at its first use: Triton 3.2's ``autotune`` asks the
        active GPU driver for a benchmarker, so building it at import fails on a machine without one."""
        return triton.autotune(configs=_CONFIGS_32 if fp32 else _CONFIGS_16, key=_AUTOTUNE_KEY)(
            _scorer_partial_kernel)

    # One fixed configuration for the interpreter (autotuning there only burns CPU time).
    _INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 128, "BLOCK_K": 32, "SPLIT_TARGET": 8}

    _COMBINE_BLOCK = 64
    _COMBINE_BLOCK_K = 32


def _partial_grid(n: int, v: int, max_splits: int):
    def grid(meta):
        tb = _cdiv(n, meta["BLOCK_N"])
        splits = min(max_splits, _cdiv(v, meta["BLOCK_V"]), max(1, _cdiv(meta["SPLIT_TARGET"], tb)))
        return (tb, max(1, splits))

    return grid


def _launch_triton(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    softcap: Optional[float],
    wrap=None,
    config: Optional[dict] = None,
    poison: bool = False,
    top2_tuple: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the two Triton kernels. ``wrap`` is ``torch.library.wrap_triton`` inside the op (so that
    tracing sees the kernels) and the identity otherwise; ``config`` (BLOCK_N, BLOCK_V, BLOCK_K,
    SPLIT_TARGET, optionally num_warps / num_stages) bypasses autotuning; ``poison`` (tests) fills
    the outputs and the workspace with NaN and the split count with 0 before the launches;
    ``top2_tuple`` picks the tile top-2 reduction (default: the one-pass tuple reduction on a GPU,
    the built-in reductions under the interpreter, where the tuple one runs element by element)."""
    if wrap is None:
        wrap = lambda k: k  # noqa: E731
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    ms = _max_splits(N, V)
    labels = labels.contiguous()
    if poison:
        ws = torch.full((ms * 5 * N,), math.nan, dtype=torch.float32, device=dev)
        cnt = torch.zeros((1,), dtype=torch.int32, device=dev)
        outs = [torch.full((N,), math.nan, dtype=torch.float32, device=dev) for _ in range(5)]
    else:
        ws = torch.empty((ms * 5 * N,), dtype=torch.float32, device=dev)
        cnt = torch.empty((1,), dtype=torch.int32, device=dev)
        outs = [torch.empty((N,), dtype=torch.float32, device=dev) for _ in range(5)]
    has_bias = bias is not None
    if has_bias:
        bias = bias.contiguous()
    b = bias if has_bias else weight  # any valid pointer; never read
    cap = float(softcap) if softcap is not None else 1.0
    fp32 = hidden.dtype == torch.float32
    grid = _partial_grid(N, V, ms)
    args = (
        hidden, weight, b, ws, cnt,
        N, V, H, _n_bucket(N),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        cap,
    )
    consts = dict(
        HAS_BIAS=has_bias,
        HAS_SOFTCAP=softcap is not None,
        FP32_DOT=fp32,
        UPCAST_DOT=_INTERPRET and hidden.dtype == torch.bfloat16,
        TOP2_TUPLE=(not _INTERPRET) if top2_tuple is None else bool(top2_tuple),
    )
    if config is None and _INTERPRET:
        config = _INTERPRET_CONFIG
    if config is not None:
        wrap(_scorer_partial_kernel)[grid](*args, **consts, **config)
    else:
        wrap(_autotuned_partial(fp32))[grid](*args, **consts)
    wrap(_scorer_combine_kernel)[(_cdiv(N, _COMBINE_BLOCK),)](
        ws, cnt, hidden, weight, b, labels,
        outs[0], outs[1], outs[2], outs[3], outs[4],
        N, V, H,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        cap,
        HAS_BIAS=has_bias,
        HAS_SOFTCAP=softcap is not None,
        BLOCK=_COMBINE_BLOCK,
        BLOCK_K=_COMBINE_BLOCK_K,
    )
    return tuple(outs)
