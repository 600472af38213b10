"""Pass: the main pass's selective loss without its logits (``cggr::fused_linear_cross_entropy``).

Runs before the step is traced (the transform's main pass is traced by ``trace_routed_step``, so
this decides what that trace contains) and once more on the traced graph.

Precondition: the wrapped model and the option ``fused_loss`` (``False``, ``True`` or ``"auto"``).
:func:`choose_fused_loss` decides, once per model, whether the main pass can run as
``base_model(...) -> final hidden states`` and then the fused head + selective cross-entropy
(:mod:`cggr_compile.ops.fused_linear_ce`) instead of ``model(...) -> logits`` and
``scoring.selective_cross_entropy``. It applies to a Hugging Face causal LM of a tested
architecture whose head is one ``nn.Linear`` (tied or not, with or without bias; Gemma 2's final
logit soft-capping is implemented by the op), with no forward hooks on the model or its head (they
would be skipped), not under FSDP2 (the root's gather hook would be skipped too) and without a logit
scale in its config. A PEFT ``PeftModel`` is looked through (LoRA acts inside the layers; prompt
learning, which adds virtual tokens in the wrapper's forward, is refused; a LoRA-wrapped head is
no ``nn.Linear``). Otherwise the result says why (``True`` then warns, or raises under
``strict``; ``"auto"`` stays silent and logs at debug level).

Guarantees: with the fusion chosen, the main pass returns an output whose ``logits`` is None and
whose ``last_hidden_state`` holds the main pass's final hidden states, and the loss is
:func:`selective_loss` of it: the same number as the unfused loss up to float rounding, under every
SPEC loss rule (-100, padding, the normaliser, zero not NaN), with no ``[rows, T, V]`` logits in
the graph. ``passes/check_fused_loss.py`` checks the traced graph (one op node when chosen, none
otherwise) and writes the reason to ``gm.meta["cggr_fused_loss"]``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from cggr_compile import scoring as S
from cggr_compile.errors import fall_back
from cggr_compile.ops.fused_linear_ce import selective_linear_cross_entropy

log = logging.getLogger(__name__)

SETTINGS = (False, True, "auto")
OP_TARGET = "cggr.fused_linear_cross_entropy"
# Config attributes of models whose forward scales the logits after the head (Cohere, Granite...):
# the fused loss would miss that scale.
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logits_scale")
# Keyword arguments of a CausalLM's forward that its base model does not take (they shape the
# logits, which the fused loss never forms).
_HEAD_ONLY_KWARGS = ("logits_to_keep", "num_logits_to_keep", "return_dict")


@dataclass(frozen=True)
class FusedLoss:
    """The pass's choice for one model: the pieces the fused main pass calls, or why there is none."""

    reason: str
    base: Optional[nn.Module] = None
    head: Optional[nn.Linear] = None
    softcap: Optional[float] = None
    base_accepts_use_cache: bool = False

    def __bool__(self) -> bool:
        return self.head is not None


def check_setting(value: Any) -> None:
    """``fused_loss`` must be False, True or "auto" (for callers of :func:`choose_fused_loss` that
    build no ``CGGRConfig``, whose own check says the same)."""
    if not any(value is s if isinstance(s, bool) else value == s for s in SETTINGS):
        raise ValueError(
            f"fused_loss must be False, True or 'auto', got {value!r}: True fuses the main pass's "
            "head with its loss (no logits), 'auto' does so where the model allows it."
        )


def _why_not_peft(wrapper: nn.Module) -> Optional[str]:
    """A PEFT ``PeftModel`` whose forward adds nothing the fused main pass would skip (LoRA and the
    like act inside the wrapped model's layers; prompt learning adds virtual tokens in the wrapper)."""
    config = getattr(wrapper, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return f"the PEFT method {getattr(config, 'peft_type', '?')} adds its virtual tokens in PeftModel.forward"
    if wrapper._forward_hooks or wrapper._forward_pre_hooks:
        return "the PEFT wrapper has forward hooks, which the fused main pass would skip"
    return None


def _why_not(model: nn.Module) -> tuple[Optional[str], Any, Any]:
    from cggr_compile.router import SUPPORTED_ARCHITECTURES, describe

    try:
        arch = describe(model)
    except ValueError as err:
        return f"{err}", None, None
    if not arch.causal:
        return f"{arch.model_type} is a masked LM (its head is not one linear layer)", None, None
    if arch.model_type not in SUPPORTED_ARCHITECTURES:
        return (f"{arch.model_type} is not among the tested architectures (its forward may do more with "
                "the hidden states than apply the head)"), None, None
    head = getattr(model, arch.head_name)
    if type(head) is not nn.Linear:
        return f"the head {arch.head_name} is a {type(head).__name__}, not one nn.Linear", None, None
    scale = next((a for a in _LOGIT_SCALES if getattr(model.config, a, None) not in (None, 1, 1.0)), None)
    if scale is not None:
        return f"the config's {scale} scales the logits after the head", None, None
    for what, m in (("the model", model), (f"the head {arch.head_name}", head)):
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{what} has forward hooks, which the fused main pass would skip", None, None
    if hasattr(model, "unshard") and hasattr(model, "reshard"):
        return "the model is FSDP2-sharded (the root's gather hook would not run)", None, None
    return None, arch, head


def choose_fused_loss(model: nn.Module, setting: Any = "auto", strict: bool = False) -> FusedLoss:
    """Whether (and with which pieces) the main pass's loss is fused, for ``fused_loss=setting``."""
    check_setting(setting)
    if setting is False:
        return FusedLoss("fused_loss=False")
    from cggr_compile.router import unwrap_peft

    inner = unwrap_peft(model)  # a PeftModel: the model inside, its LoRA layers and all
    why = _why_not_peft(model) if inner is not model else None
    arch = head = None
    if why is None:
        why, arch, head = _why_not(inner)
    if why is not None:
        if setting is True:
            fall_back(f"cggr: fused_loss=True, but {why}; the main pass's loss uses the model's logits. "
                      "Use fused_loss='auto' (fuse where possible) or False.", strict, stacklevel=4)
        log.debug("fuse_loss: the main pass's loss stays unfused: %s", why)
        return FusedLoss(why)
    base = getattr(inner, arch.base_name)
    v, h = head.weight.shape
    tied = any(p is head.weight for n, p in base.named_parameters())
    reason = (f"fused: {arch.model_type} head {v}x{h}" + (" + bias" if head.bias is not None else "")
              + (" (tied to the embedding)" if tied else "") + (" (inside PEFT)" if inner is not model else "")
              + (f", soft-capped at {arch.softcap:g}" if arch.softcap is not None else ""))
    try:
        accepts = "use_cache" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return FusedLoss(reason, base, head, arch.softcap, accepts)


def fused_main_pass(choice: FusedLoss, input_ids: Tensor, attention_mask: Optional[Tensor], kwargs: dict,
                    output_cls: Any) -> Any:
    """The main pass up to the final hidden states: ``output_cls(logits=None)`` carrying them as
    ``last_hidden_state`` (the loss is then :func:`selective_loss`)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY_KWARGS}
    if choice.base_accepts_use_cache:
        kwargs["use_cache"] = False  # a training loss needs no cache
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    hidden = choice.base(input_ids=input_ids, **kwargs)[0]
    out = output_cls(logits=None)
    out["logits"] = None  # present and None: readers of out["logits"] see no logits, not a KeyError
    out["last_hidden_state"] = hidden
    return out


def selective_loss(choice: FusedLoss, out: Any, target: Tensor, weight: Tensor, denominator: Any = None,
                   return_token_loss: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The main pass's loss: fused from ``out``'s hidden states where the pass chose so, else
    ``scoring.selective_cross_entropy`` of its logits. ``return_token_loss=True`` returns
    ``(loss, token_loss)``, the detached per-position loss of whichever of the two ran."""
    if not choice or out.get("logits") is not None:
        return S.selective_cross_entropy(out.logits, target, weight, denominator,
                                         return_token_loss=return_token_loss)
    head, hidden = choice.head, out["last_hidden_state"]
    if hidden.dtype != head.weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(head.weight.dtype)  # as Mamba's forward casts its float32 residual stream
    return selective_linear_cross_entropy(hidden, head.weight, head.bias, target, weight, denominator,
                                          choice.softcap, return_token_loss=return_token_loss)


def fused_loss_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith(OP_TARGET)]
