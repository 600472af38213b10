"""Fused router scorer: per-token softmax statistics straight from the hidden states.

For every token ``n`` of ``N`` this computes, without ever materialising the ``N x V`` logits,

    z      = hidden[n] @ weight.T (+ bias)            (float32 accumulation)
    z      = softcap * tanh(z / softcap)              (only when ``softcap`` is a float; Gemma2)
    lse    = logsumexp(z)
    entropy= lse - sum(softmax(z) * z)                (= -sum p log p)
    p1, p2 = the two largest softmax probabilities    (p1 >= p2; an exact tie at the top gives p1 == p2)
    nll    = lse - z[label]                           (exactly 0.0 where label == -100)

all returned as float32 tensors shaped like ``labels``. These are the numbers SPEC.md's "Scoring"
section needs (entropy, margin = 1 - (p1 - p2), loss = nll).

Layout (Liger-Kernel's: kernels, op, thin wrapper apart):

* :mod:`.scorer_kernels`: the Triton kernels (CUDA + Triton, or any device under
  ``TRITON_INTERPRET=1``) and their launcher.
* :mod:`.scorer_torch`: the chunked plain-torch computation of the same math, for every other
  device (and CUDA without Triton); never ``O(N * V)`` memory.
* this module: the custom op ``cggr::fused_token_stats`` (a ``torch.library.triton_op`` launching
  through ``torch.library.wrap_triton``, so Inductor sees the kernels and calls them from inside a
  compiled graph; the torch path as the opaque ``cggr::fused_token_stats_torch``), its fake impl,
  its autocast rule, and the public wrapper :func:`fused_token_stats`.

Labels outside ``[0, V)`` other than -100 give ``nll = NaN`` (no device assert, no host sync).
The op has no autograd formula: it is the router's scorer. :func:`fused_token_stats` runs it under
``torch.no_grad()``; calling the raw op on inputs that require grad while grad mode is on raises.
"""

import os
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..scoring import IGNORE_INDEX
from .scorer_kernels import HAS_TRITON, _INTERPRET, _launch_triton, _max_splits, _partial_grid  # noqa: F401
from .scorer_torch import _TORCH_CHUNK_ELEMS, _TORCH_CHUNK_VOCAB, _torch_token_stats  # noqa: F401

if HAS_TRITON:  # the autotuning configs, for tests that pick one
    from .scorer_kernels import _CONFIGS_16, _CONFIGS_32  # noqa: F401

__all__ = [
    "fused_token_stats",
    "HAS_TRITON",
    "HAS_TRITON_OP",
    "IGNORE_INDEX",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# "auto" (Triton on CUDA, torch elsewhere), "torch" (always the torch path) or "triton" (Triton on
# any device; with TRITON_INTERPRET=1 that runs the kernels on the CPU, for tests).
_BACKEND = os.environ.get("CGGR_FUSED_SCORER_BACKEND", "auto").lower()

_triton_op = getattr(torch.library, "triton_op", None)
_wrap_triton = getattr(torch.library, "wrap_triton", None) or getattr(torch.library, "capture_triton", None)
HAS_TRITON_OP = HAS_TRITON and _triton_op is not None and _wrap_triton is not None


def _fake_token_stats(hidden, weight, bias, labels, softcap=None):
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=torch.float32) for _ in range(5))


# ----------------------------------------------------------------------------------------------
# Custom-op registration
# ----------------------------------------------------------------------------------------------
_OPS = "cggr::fused_token_stats"
_OPS_TORCH = "cggr::fused_token_stats_torch"


@torch.library.custom_op(_OPS_TORCH, mutates_args=())
def _fused_token_stats_torch_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    softcap: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _torch_token_stats(hidden, weight, bias, labels, softcap)


_fused_token_stats_torch_op.register_fake(_fake_token_stats)


def _use_triton(t: Tensor) -> bool:
    if not HAS_TRITON or _BACKEND == "torch":
        return False
    if _BACKEND == "triton":
        return True
    return t.device.type == "cuda"


def _fused_token_stats_impl(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    softcap: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _use_triton(hidden):
        wrap = _wrap_triton if (HAS_TRITON_OP and not _INTERPRET) else None
        return _launch_triton(hidden, weight, bias, labels, softcap, wrap=wrap)
    # Inside the op's decomposition (AOTAutograd) this stays one opaque node.
    return torch.ops.cggr.fused_token_stats_torch(hidden, weight, bias, labels, softcap)


def _direct_impl(hidden, weight, bias, labels, softcap=None):
    """Eager host-side dispatch: the Triton kernel where chosen (CGGR_FUSED_SCORER_BACKEND=triton
    with TRITON_INTERPRET=1 on the CPU, say), else the chunked torch path."""
    if _use_triton(hidden):
        return _launch_triton(hidden, weight, bias, labels, softcap)
    return _torch_token_stats(hidden, weight, bias, labels, softcap)


if HAS_TRITON_OP:
    _fused_token_stats_op = _triton_op(_OPS, _fused_token_stats_impl, mutates_args=())
    # Eager CPU calls go straight to the torch path (the fake/meta kernel is the body above,
    # which triton_op registers itself: it only allocates and launches traceable kernels).
    _fused_token_stats_op.register_kernel("cpu")(_direct_impl)
else:  # pragma: no cover - old torch or no triton
    _direct_impl.__annotations__ = dict(_fused_token_stats_impl.__annotations__)
    _fused_token_stats_op = torch.library.custom_op(_OPS, _direct_impl, mutates_args=())
    _fused_token_stats_op.register_fake(_fake_token_stats)


# ----------------------------------------------------------------------------------------------
# Autocast rule
# ----------------------------------------------------------------------------------------------
# Inside an autocast region the unfused head (a linear layer) runs in the region's dtype, so the op
# takes its float inputs in that dtype too (an fp32 matmul would cost several times the bf16 one),
# then runs with autocast off: its own float32 math stays float32. torch.library.register_autocast
# (torch >= 2.5) only takes one fixed dtype per device, where the region's dtype (bf16 or fp16) is
# what the unfused head gets, so the rule is registered on the autocast keys the way it registers
# its own, reading the dtype at call time.
_AUTOCAST_DEVICES = ("cpu", "cuda")
_autocast_lib = torch.library.Library("cggr", "FRAGMENT")


def _autocast_rule(device_type: str) -> Callable[..., Tuple[Tensor, ...]]:
    key = getattr(torch._C.DispatchKey, "Autocast" + device_type.upper())
    keyset = torch._C.DispatchKeySet(key)

    def kernel(_keyset, hidden, weight, bias, labels, softcap=None):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t: Optional[Tensor]) -> Optional[Tensor]:
            # what autocast does to a lower-precision op's inputs (register_autocast's rule)
            if t is not None and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64:
                return t.to(dtype)
            return t

        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return torch.ops.cggr.fused_token_stats.default(cast(hidden), cast(weight), cast(bias), labels, softcap)

    return kernel


for _device in _AUTOCAST_DEVICES:
    _autocast_lib.impl("fused_token_stats", _autocast_rule(_device), "Autocast" + _device.upper(), with_keyset=True)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def fused_token_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    softcap: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``(lse, entropy, p1, p2, nll)`` of ``softmax(hidden @ weight.T + bias)``.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``) router hidden states, float32 / bfloat16 / float16.
            Cast to ``weight.dtype`` when the two differ.
        weight: ``[V, H]`` output-head weight (``lm_head.weight``), same dtypes.
        bias: optional ``[V]`` output-head bias.
        labels: int64 ``[N]`` (shaped like ``hidden.shape[:-1]``) label per token, -100 to ignore;
            ``None`` means no labels (``nll`` is all zeros).
        softcap: Gemma2's ``final_logit_softcapping``: logits become ``c * tanh(z / c)``.

    Returns:
        ``(lse, entropy, p1, p2, nll)``, float32, each shaped like ``hidden.shape[:-1]``:
        logsumexp, entropy ``-sum p log p``, the two largest probabilities (``p1 >= p2``), and
        ``-log p[label]`` (0.0 where the label is -100, NaN where it is outside ``[0, V)``).

    Never materialises the ``N x V`` logits. Runs without gradient (the outputs never require
    grad). On CUDA with Triton it is one custom op that Inductor compiles into its graph. Inside a
    ``torch.autocast`` region (CPU or CUDA) the op's autocast rule casts ``hidden``, ``weight`` and
    ``bias`` to the region's dtype, as autocast does to the unfused head.
    """
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fused_token_stats: hidden and weight must be tensors")
    if hidden.dim() < 1:
        raise ValueError("fused_token_stats: hidden must be [..., H]")
    if weight.dim() != 2:
        raise ValueError(f"fused_token_stats: weight must be [V, H], got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(
            f"fused_token_stats: hidden's last dim {hidden.shape[-1]} != weight's H {H} (weight is [V, H])"
        )
    if V < 1:
        raise ValueError("fused_token_stats: empty vocabulary")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fused_token_stats: weight dtype {weight.dtype} not in float32/bfloat16/float16")
    if hidden.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fused_token_stats: hidden dtype {hidden.dtype} not in float32/bfloat16/float16")
    if hidden.device != weight.device:
        raise ValueError(f"fused_token_stats: hidden on {hidden.device}, weight on {weight.device}")
    if bias is not None:
        if bias.shape != (V,):
            raise ValueError(f"fused_token_stats: bias must be [V]={V}, got {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError("fused_token_stats: bias on another device than weight")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0.0:
            raise ValueError(f"fused_token_stats: softcap must be > 0 or None, got {softcap}")
    lead = hidden.shape[:-1]
    if labels is None:
        labels = torch.full(lead, IGNORE_INDEX, dtype=torch.int64, device=hidden.device)
    else:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("fused_token_stats: labels must be an integer tensor")
        if labels.shape != lead:
            raise ValueError(
                f"fused_token_stats: labels shape {tuple(labels.shape)} != hidden.shape[:-1] {tuple(lead)}"
            )
        if labels.device != hidden.device:
            raise ValueError("fused_token_stats: labels on another device than hidden")

    with torch.no_grad():
        h2 = hidden.reshape(-1, H)
        if h2.dtype != weight.dtype:
            h2 = h2.to(weight.dtype)
        lab = labels.reshape(-1).to(torch.int64).contiguous()
        if h2.shape[0] == 0:
            empty = torch.empty(lead, dtype=torch.float32, device=hidden.device)
            return tuple(empty.clone() for _ in range(5))
        outs = torch.ops.cggr.fused_token_stats(h2, weight, bias, lab, softcap)
    return tuple(o.reshape(lead) for o in outs)
