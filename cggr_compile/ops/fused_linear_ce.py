"""Fused lm_head + selective cross-entropy: the main pass's loss without its ``N x V`` logits.

For ``N`` tokens with hidden states ``h`` (``[N, H]``), the head ``W`` (``[V, H]``, optional bias
``b``), aligned targets ``y`` and per-token loss weights ``w`` this computes

    z_n    = h_n @ W.T (+ b)                      (in the inputs' dtype, like ``nn.Linear``)
    z_n    = c * tanh(z_n / c)                    (only with ``softcap``: Gemma 2)
    total  = sum_n w_n * (logsumexp(z_n) - z_n[y_n])   over the rows with y_n != -100 and w_n != 0

and the loss is ``total / denominator`` with exactly the normaliser rules of
:func:`cggr_compile.scoring.selective_cross_entropy` (which materialises the logits). The op also
writes every row's unweighted ``logsumexp(z_n) - z_n[y_n]`` (detached; ``return_token_loss``).

Design (the layout of Liger-Kernel's fused linear cross-entropy: kernel, autograd op, wrapper):

* **kernel** (:func:`_chunked_forward_backward`): a plain-torch loop over chunks of tokens. Per
  chunk it forms the ``C x V`` logits, their logsumexp and the chunk's loss, and since the loss is a
  sum of per-token terms it also forms ``dz = w * (softmax(z) - onehot(y))`` at once and turns it
  into this chunk's rows of ``dL/dh`` and its share of ``dL/dW`` / ``dL/db`` (accumulated). So only
  one chunk of logits ever exists (``chunk_tokens x V``, sized by :func:`default_chunk_tokens`), and
  the backward is a scale. The element-wise middle of a chunk (:func:`_chunk_epilogue`: upcast,
  logsumexp, label pick, softmax gradient, cast) is compiled once with Inductor on CUDA (one
  reduction and one write over the chunk instead of eager's half-dozen float32 passes); elsewhere,
  and with ``CGGR_FUSED_LOSS_COMPILE_CHUNKS=0``, it runs eagerly. The matrix products stay cuBLAS.
* **autograd op**: ``cggr::fused_linear_cross_entropy``, a ``torch.library.custom_op`` with
  ``register_fake`` and ``register_autograd``: Dynamo, AOTAutograd and Inductor see one opaque node
  (``torch.compile(fullgraph=True)`` traces it; no fake-tensor trouble inside the loop, which never
  runs under tracing), and it is the node that shows in the rewritten step's graph.
* **wrapper** (:func:`selective_linear_cross_entropy`): checks, flattening, autocast, which gradients
  are needed, and the division by the normaliser (plain torch, so its gradient is autograd's).

Which gradients are computed in the forward follows ``requires_grad`` (a frozen head skips the
``dW`` product); with grad mode off none is. ``dW`` and ``db`` are accumulated in the weight's dtype
(as ``nn.Linear``'s backward writes them; fp16 accumulates in float32, where a sum over many tokens
could overflow), or in ``accum_dtype``. Labels outside ``[0, V)`` other than -100 give a NaN loss
and NaN gradients (no device assert, no host sync), like the fused scorer's NaN ``nll``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..scoring import IGNORE_INDEX

__all__ = [
    "selective_linear_cross_entropy",
    "default_chunk_tokens",
    "OP_NAME",
    "IGNORE_INDEX",
]

OP_NAME = "cggr::fused_linear_cross_entropy"
_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Logit elements per chunk: 2**27 is 256 MiB of bf16 logits plus as much for their gradient, which
# for a 128k vocabulary is 1024 tokens per chunk (the GEMMs stay large) and for 49k, 2048.
CHUNK_ELEMENTS = 1 << 27
MIN_CHUNK_TOKENS = 16


def default_chunk_tokens(n: int, v: int, max_elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: the largest power of two with ``chunk * v <= max_elements`` (at least
    ``MIN_CHUNK_TOKENS``, at most ``n``). Plain ints, so it traces with static shapes."""
    c = max(MIN_CHUNK_TOKENS, max_elements // max(1, v))
    c = 1 << (c.bit_length() - 1)  # a power of two: the GEMM tiles divide it
    return max(1, min(n, c))


def _loss_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _new_buffer(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of the op's outputs (tests swap this for NaN-filled buffers: every element
    of a gradient must be written, not left over)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
def _chunk_epilogue(
    z: Tensor, y: Tensor, w: Tensor, softcap: Optional[float], need_grad: bool, out_dtype: torch.dtype,
    need_bias: bool = False,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """From a chunk's raw logits ``z`` ``[C, V]`` (the head's output dtype): the chunk's weighted
    loss sum (float32 scalar), each row's unweighted loss ``lse - z[y]`` (float32 ``[C]``; 0 where
    ``y`` is -100, NaN where it is outside ``[0, V)``, whatever the weight), and, if ``need_grad``,
    ``dL/dz`` in ``out_dtype`` ``[C, V]`` and, if ``need_bias``, its float32 column sums ``[V]`` (the
    bias gradient). Float64 logits keep float64 throughout."""
    v = z.shape[1]
    zf = z if z.dtype == torch.float64 else z.float()  # float32 math, float64 kept (references)
    t = None
    if softcap is not None:
        t = torch.tanh(zf / softcap)
        zf = t * softcap
    labelled = y != IGNORE_INDEX
    valid = labelled & (w != 0)
    in_range = (y >= 0) & (y < v)
    yc = torch.where(in_range, y, torch.zeros_like(y))
    lse = torch.logsumexp(zf, dim=1)
    zy = zf.gather(1, yc[:, None]).squeeze(1)
    wf = w.to(zf.dtype)
    # NaN for a label outside [0, V): poisons the loss and the gradient instead of a device assert.
    scale = torch.where(valid, torch.where(in_range, wf, torch.full_like(wf, math.nan)), torch.zeros_like(wf))
    # where, not multiply: an ignored row's loss is 0 even when its logits overflow
    nll = lse - zy
    total = torch.where(valid, scale * nll, torch.zeros_like(scale)).sum()
    token = torch.where(labelled, torch.where(in_range, nll, torch.full_like(nll, math.nan)), torch.zeros_like(nll))
    if not need_grad:
        return total, token, None, None
    # dL/dz = w * (softmax(z) - onehot(y)); the exp is recomputed here from z and lse
    g = torch.exp(zf - lse[:, None]) * scale[:, None]
    onehot = torch.arange(v, device=z.device)[None, :] == yc[:, None]
    g = torch.where(onehot, g - scale[:, None], g)
    if t is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2
        g = g * (1.0 - t * t)
    return total, token, g.to(out_dtype), (g.sum(0) if need_bias else None)


_COMPILED: dict[str, Any] = {}


def _compile_chunks(device: torch.device) -> bool:
    flag = os.environ.get("CGGR_FUSED_LOSS_COMPILE_CHUNKS", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return device.type == "cuda"  # Inductor's Triton code; on the CPU its C++ build is not worth it


def _epilogue_fn(device: torch.device) -> Any:
    if not _compile_chunks(device):
        return _chunk_epilogue
    fn = _COMPILED.get("epilogue")
    if fn is None:
        # Automatic dynamic shapes: the second row count seen (the last chunk, another level's k)
        # recompiles once with a symbolic one, so a schedule never runs into the recompile limit.
        fn = torch.compile(_chunk_epilogue, fullgraph=True)
        _COMPILED["epilogue"] = fn
    return fn


def _chunked_forward_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, token_weight: Tensor,
    softcap: Optional[float], chunk_tokens: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
    accum_dtype: Optional[torch.dtype],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss sum, (where asked) its gradients w.r.t. hidden, weight and bias, and every row's
    unweighted loss ``[N]`` (see :func:`_chunk_epilogue`), one chunk of tokens at a time. Gradients
    not asked for come back as empty tensors."""
    n, h_dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    need = grad_hidden or grad_weight or grad_bias
    epilogue = _epilogue_fn(dev)
    acc_dt = accum_dtype or (torch.float32 if weight.dtype == torch.float16 else weight.dtype)
    dh = _new_buffer((n, h_dim), hidden.dtype, dev) if grad_hidden else hidden.new_empty(0)
    dw_acc = _new_buffer((v, h_dim), acc_dt, dev).zero_() if grad_weight else None
    db_acc = torch.zeros((v,), dtype=_loss_dtype(hidden), device=dev) if grad_bias else None
    total = torch.zeros((), dtype=_loss_dtype(hidden), device=dev)
    token_loss = _new_buffer((n,), _loss_dtype(hidden), dev)
    c = max(1, chunk_tokens)
    for s in range(0, n, c):
        e = min(n, s + c)
        h = hidden[s:e]
        z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        part, tok, g, gsum = epilogue(z, target[s:e], token_weight[s:e], softcap, need, hidden.dtype, grad_bias)
        total = total + part
        token_loss[s:e] = tok
        if g is None:
            continue
        if grad_hidden:
            torch.mm(g, weight, out=dh[s:e])
        if grad_weight:
            if acc_dt == g.dtype:
                dw_acc.addmm_(g.t(), h)
            else:
                dw_acc += torch.mm(g.t(), h).to(acc_dt)
        if grad_bias:
            db_acc += gsum
    dw = dw_acc.to(weight.dtype) if dw_acc is not None else weight.new_empty(0)
    db = db_acc.to(bias.dtype) if db_acc is not None else weight.new_empty(0)
    return total, dh, dw, db, token_loss


# ----------------------------------------------------------------------------------------------
# Autograd op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(OP_NAME, mutates_args=())
def _fused_linear_ce_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, token_weight: Tensor,
    softcap: Optional[float], chunk_tokens: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
    accum_float32: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _chunked_forward_backward(
        hidden, weight, bias, target, token_weight, softcap, chunk_tokens, grad_hidden, grad_weight,
        grad_bias, torch.float32 if accum_float32 else None,
    )


@_fused_linear_ce_op.register_fake
def _fake(hidden, weight, bias, target, token_weight, softcap, chunk_tokens, grad_hidden, grad_weight,
          grad_bias, accum_float32):
    total = hidden.new_empty((), dtype=_loss_dtype(hidden))
    dh = hidden.new_empty(tuple(hidden.shape)) if grad_hidden else hidden.new_empty(0)
    dw = weight.new_empty(tuple(weight.shape)) if grad_weight else weight.new_empty(0)
    db = weight.new_empty((weight.shape[0],), dtype=bias.dtype) if (grad_bias and bias is not None) \
        else weight.new_empty(0)
    token_loss = hidden.new_empty((hidden.shape[0],), dtype=_loss_dtype(hidden))
    return total, dh, dw, db, token_loss


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, _, bias, _, _, _, _, gh, gw, gb, _ = inputs
    _, dh, dw, db, token_loss = output
    ctx.flags = (gh, gw, gb and bias is not None)
    ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db, token_loss)


def _scaled(g: Tensor, grad: Tensor) -> Tensor:
    return (grad.float() * g).to(grad.dtype)  # scale in float32, one rounding


def _backward(ctx: Any, g_total: Tensor, *_: Any) -> tuple:
    dh, dw, db = ctx.saved_tensors
    gh, gw, gb = ctx.flags
    return (
        _scaled(g_total, dh) if gh else None,
        _scaled(g_total, dw) if gw else None,
        _scaled(g_total, db) if gb else None,
        None, None, None, None, None, None, None, None,
    )


_fused_linear_ce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Wrapper
# ----------------------------------------------------------------------------------------------
def _check(hidden: Any, weight: Any, bias: Any, target: Any, token_weight: Any, softcap: Any) -> None:
    name = "selective_linear_cross_entropy"
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor) or hidden.dim() < 1:
        raise TypeError(f"{name}: hidden ([..., H]) and weight ([V, H]) must be tensors")
    if weight.dim() != 2 or weight.shape[0] < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: weight must be [V, H] with V >= 1 and H = hidden's last dim {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    for what, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {what} is {t.dtype}; use float64, float32, bfloat16 or float16")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{name}: bias must be [V] = [{weight.shape[0]}]")
    lead = tuple(hidden.shape[:-1])
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool \
            or tuple(target.shape) != lead:
        raise ValueError(f"{name}: target must be an integer tensor shaped like hidden.shape[:-1] = {lead}")
    if not isinstance(token_weight, Tensor) or tuple(token_weight.shape) != lead:
        raise ValueError(f"{name}: weight (the selection) must be a tensor shaped like the target {lead}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"{name}: softcap must be > 0 or None, got {softcap!r}")


def selective_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, token_weight: Tensor,
    denominator: Optional[Tensor | int | float] = None, softcap: Optional[float] = None,
    chunk_tokens: Optional[int] = None, accum_dtype: Optional[torch.dtype] = None,
    return_token_loss: bool = False,
) -> Tensor | Tuple[Tensor, Tensor]:
    """``selective_cross_entropy(linear(hidden, weight, bias), target, token_weight, denominator)``
    (soft-capped first if ``softcap``) without the ``[..., V]`` logits.

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm), float32 / bf16 / fp16.
        weight, bias: the head, ``[V, H]`` and ``[V]`` or None (a tied head passes the embedding).
        target: labels aligned with the positions (``scoring.aligned_labels``), -100 to ignore.
        token_weight: the selection, shaped like ``target``: bool (mean over the true positions) or
            float (``selection='importance'``: weighted sum, divided by ``weight.sum()``).
        denominator: replaces the count of selected positions, as in ``selective_cross_entropy``.
        softcap: Gemma 2's ``final_logit_softcapping`` (``z = c * tanh(z / c)``).
        chunk_tokens: tokens per chunk (default :func:`default_chunk_tokens`).
        accum_dtype: dtype of the ``dW``/``db`` accumulation (default: the weight's; fp16: float32).
        return_token_loss: also return the per-token loss (below).

    Returns a float32 scalar (float64 for float64 inputs); no selected or valid position gives a zero connected to the graph.
    With ``return_token_loss``, ``(loss, token_loss)``: ``token_loss`` shaped like ``target``, in the
    loss's dtype and detached, the cross-entropy at every position with a label whatever its weight,
    0 at -100 and NaN for a label outside ``[0, V)`` (the op writes it in the same pass).
    Under autocast the head runs in the autocast dtype, as ``nn.Linear`` would.
    """
    _check(hidden, weight, bias, target, token_weight, softcap)
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        dt = torch.get_autocast_dtype(kind)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        raise TypeError(
            f"selective_linear_cross_entropy: hidden is {hidden.dtype} but the head's weight is "
            f"{weight.dtype}; nn.Linear would refuse this too (cast one, or run under autocast)"
        )
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)
    h_dim, v = weight.shape[1], weight.shape[0]
    h2 = hidden.reshape(-1, h_dim)
    n = h2.shape[0]
    y = target.reshape(-1).to(torch.int64)
    tw = token_weight.reshape(-1)
    grad_on = torch.is_grad_enabled()
    gh = grad_on and hidden.requires_grad
    gw = grad_on and weight.requires_grad
    gb = grad_on and bias is not None and bias.requires_grad
    chunk = int(chunk_tokens) if chunk_tokens else default_chunk_tokens(max(1, n), v)
    accum32 = accum_dtype == torch.float32
    if accum_dtype is not None and accum_dtype not in (torch.float32, weight.dtype):
        raise ValueError(f"selective_linear_cross_entropy: accum_dtype must be float32 or the weight's "
                         f"dtype {weight.dtype}, got {accum_dtype}")
    outs = torch.ops.cggr.fused_linear_cross_entropy(
        h2, weight, bias, y, tw, None if softcap is None else float(softcap), chunk, gh, gw, gb, accum32,
    )
    total = outs[0]
    # The normaliser, exactly as scoring.selective_cross_entropy divides.
    if token_weight.is_floating_point():
        if denominator is None:
            loss = total / token_weight.sum().to(total.dtype).clamp(min=1e-12)
        else:
            loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1).to(total.dtype)
    else:
        count = token_weight.sum() if denominator is None else torch.as_tensor(denominator, device=total.device)
        loss = total / count.clamp(min=1).to(total.dtype)
    if return_token_loss:
        return loss, outs[4].reshape(target.shape)
    return loss
