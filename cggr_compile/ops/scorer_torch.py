"""Plain-torch path of the fused router scorer (CPU, any non-CUDA device, CUDA without Triton).

The same math as :mod:`.scorer_kernels`, chunked over tokens and vocabulary with an online merge, so
that the extra memory is ``O(chunk_tokens * chunk_vocab + chunk_vocab * H)``, never ``O(N * V)``.
The op (:mod:`.fused_scorer`) runs it as ``cggr::fused_token_stats_torch``.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..scoring import IGNORE_INDEX

_TORCH_CHUNK_ELEMS = 1 << 22  # fp32 logits per chunk (16 MiB)
_TORCH_CHUNK_VOCAB = 8192


def _torch_token_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    softcap: Optional[float],
    chunk_tokens: Optional[int] = None,
    chunk_vocab: Optional[int] = None,
    poison: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The same statistics in plain torch, chunked over tokens and vocabulary (online merge).

    ``chunk_tokens`` / ``chunk_vocab`` override the chunk sizes (tests); ``poison`` pre-fills the
    outputs with NaN so that an unwritten element shows."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cv = min(V, chunk_vocab or _TORCH_CHUNK_VOCAB)
    cn = max(1, min(N, chunk_tokens or max(1, _TORCH_CHUNK_ELEMS // cv)))
    f32 = torch.float32
    lse_o = torch.full((N,), math.nan, dtype=f32, device=dev) if poison else torch.empty((N,), dtype=f32, device=dev)
    ent_o, p1_o, p2_o, nll_o = (lse_o.clone() if poison else torch.empty_like(lse_o) for _ in range(4))
    w_whole = weight.to(f32) if V <= cv else None  # one vocabulary chunk: upcast once
    b32 = bias.to(f32) if bias is not None else None
    for n0 in range(0, N, cn):
        n1 = min(N, n0 + cn)
        h = hidden[n0:n1].to(f32)
        rows = n1 - n0
        m = torch.full((rows,), -math.inf, dtype=f32, device=dev)
        s = torch.zeros((rows,), dtype=f32, device=dev)
        t = torch.zeros((rows,), dtype=f32, device=dev)
        top = torch.full((rows, 2), -math.inf, dtype=f32, device=dev)
        for v0 in range(0, V, cv):
            v1 = min(V, v0 + cv)
            w = w_whole if w_whole is not None else weight[v0:v1].to(f32)
            z = h @ w.t()
            if b32 is not None:
                z = z + b32[v0:v1]
            if softcap is not None:
                z = torch.tanh(z / softcap) * softcap
            m_new = torch.maximum(m, z.max(dim=1).values)
            alpha = torch.exp(m - m_new)
            d = z - m_new[:, None]
            p = torch.exp(d)
            old = torch.where(s > 0, t + (m - m_new) * s, torch.zeros_like(t))
            t = alpha * old + (p * d).sum(dim=1)
            s = alpha * s + p.sum(dim=1)
            m = m_new
            kk = min(2, v1 - v0)
            cand = torch.cat([top, torch.topk(z, kk, dim=1).values], dim=1)
            top = torch.topk(cand, 2, dim=1).values
        log_s = torch.log(s)
        lse = m + log_s
        lse_o[n0:n1] = lse
        ent_o[n0:n1] = torch.clamp(log_s - t / s, min=0.0)
        p1_o[n0:n1] = torch.exp(top[:, 0] - lse).clamp(max=1.0)
        p2_o[n0:n1] = torch.exp(top[:, 1] - lse).clamp(max=1.0)
        # label logit: gathered dot product (like the Triton combine kernel)
        lab = labels[n0:n1]
        in_range = (lab >= 0) & (lab < V)
        lab_c = torch.where(in_range, lab, torch.zeros_like(lab))
        zl = (h * weight[lab_c].to(f32)).sum(dim=1)
        if b32 is not None:
            zl = zl + b32[lab_c]
        if softcap is not None:
            zl = torch.tanh(zl / softcap) * softcap
        nll = torch.clamp(lse - zl, min=0.0)
        nll = torch.where(in_range, nll, torch.full_like(nll, math.nan))
        nll_o[n0:n1] = torch.where(lab == IGNORE_INDEX, torch.zeros_like(nll), nll)
    return lse_o, ent_o, p1_o, p2_o, nll_o
