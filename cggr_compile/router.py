"""Architecture adapters and the truncated router.

The router is the model's own first K layers, its final norm and its output head, run without
gradient and without dropout. It is built as a *shallow clone* of the base model: a parallel tree
of module objects that hold the very same ``Parameter`` and buffer tensors (nothing is copied), with
the layer list cut to K and every clone in eval mode. The clone is never registered as a
submodule, so ``model.parameters()`` and ``state_dict()`` are unchanged; and because the clone runs
the base model's own ``forward`` (embeddings, scaling, rotary, masks, final norm), its logits are
exactly ``head(final_norm(hidden_after_K_layers))`` for every architecture that follows the Hugging
Face layout (``base_model`` + a ``ModuleList`` of layers + a head beside the base model).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .errors import fall_back

# model_type -> causal (False: masked LM scored without shift). Each is covered by a test.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "llama": True, "mistral": True, "qwen2": True, "qwen3": True, "gemma": True, "gemma2": True,
    "phi3": True, "gpt2": True, "gptj": True, "gpt_neox": True, "falcon": True, "opt": True,
    "mamba": True, "bert": False, "roberta": False,
}


@dataclass
class Architecture:
    """Where a model keeps the pieces the router needs."""

    model_type: str
    causal: bool
    base_name: str  # attribute of the top module holding the base model
    layers_name: str  # dotted path, inside the base model, of the ModuleList of layers
    num_layers: int
    head_name: str  # attribute of the top module holding the head
    softcap: Optional[float]  # final logit soft-capping (Gemma2), part of the head
    base_accepts_use_cache: bool


def _num_layers(config: Any) -> Optional[int]:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def describe(model: nn.Module) -> Architecture:
    """Find base model, layers and head of a Hugging Face style model.

    Raises ``ValueError`` naming what is missing when the layout is not recognised.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    base = getattr(model, "base_model", None)
    if config is None or base is None or base is model:
        raise ValueError(
            f"{type(model).__name__} has no Hugging Face base model / config, so its first layers "
            "cannot be run on their own"
        )
    base_name = next((n for n, m in model.named_children() if m is base), None)
    num_layers = _num_layers(config)
    layers_name = next(
        (n for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers),
        None,
    )
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = None
    if out_emb is not None:
        for n, m in model.named_children():
            if m is not base and any(sub is out_emb for sub in m.modules()):
                head_name = n
    if base_name is None or layers_name is None or head_name is None:
        raise ValueError(
            f"could not find the layer list (len {num_layers}) or the output head of "
            f"{type(model).__name__}"
        )
    try:
        accepts = "use_cache" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    causal = SUPPORTED_ARCHITECTURES.get(model_type, not _looks_masked(model))
    softcap = getattr(config, "final_logit_softcapping", None)
    return Architecture(
        model_type, causal, base_name, layers_name, num_layers, head_name,
        float(softcap) if softcap else None, accepts,
    )


def _looks_masked(model: nn.Module) -> bool:
    return "MaskedLM" in type(model).__name__


def _clone_tree(module: nn.Module) -> nn.Module:
    """A new module object per node, with its own ``training`` flag and child list.

    The parameter and buffer *dicts* are the originals' (not copies): whatever replaces a tensor in
    the model (FSDP2 swapping sharded and unsharded parameters, ``load_state_dict(assign=True)``,
    ``to_empty``) is seen by the router too. Hooks are shared the same way.
    """
    clone = object.__new__(type(module))  # no __init__ and no __reduce__ (FSDP2's classes define one)
    clone.__dict__ = dict(module.__dict__)
    clone._modules = {n: (_clone_tree(c) if c is not None else None) for n, c in module._modules.items()}
    return clone


def _truncated_config(config: Any, num_layers: int) -> Any:
    cfg = copy.copy(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            try:
                setattr(cfg, name, num_layers)
            except Exception:  # some configs expose read-only aliases
                pass
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        try:
            cfg.layer_types = list(layer_types)[:num_layers]
        except AttributeError:  # derived read-only property (Mamba): it follows num_hidden_layers
            pass
    return cfg


class TruncatedRouter:
    """``(input_ids, attention_mask, **row_inputs) -> logits [B, T, V]`` from the first K layers.

    Deliberately not an ``nn.Module``: it must never become a submodule (that would add its
    tensors to ``parameters()`` / ``state_dict()`` a second time).
    """

    def __init__(self, model: nn.Module, num_layers: int, arch: Architecture) -> None:
        base = getattr(model, arch.base_name)
        self.arch = arch
        self.num_layers = num_layers
        self.base = _clone_tree(base)
        parent_path, _, list_name = arch.layers_name.rpartition(".")
        parent = self.base.get_submodule(parent_path) if parent_path else self.base
        parent._modules[list_name] = nn.ModuleList(list(parent._modules[list_name])[:num_layers])
        cfg = _truncated_config(model.config, num_layers)
        for m in self.base.modules():
            if getattr(m, "config", None) is model.config:
                m.config = cfg
        # The router scores in eval mode: no dropout, whatever the model's mode.
        self.base.train(False)
        self.head = getattr(model, arch.head_name)

    def hidden(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        """The final-normed hidden state after K layers, ``[B, T, H]`` (no grad)."""
        kwargs = dict(rows)
        if self.arch.base_accepts_use_cache:
            kwargs["use_cache"] = False
        with torch.no_grad():
            return self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]

    @property
    def linear_head(self) -> Optional[nn.Linear]:
        """The head when it is one linear layer (then it can be fused with the scoring)."""
        return self.head if type(self.head) is nn.Linear else None

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        hidden = self.hidden(input_ids, attention_mask, **rows)
        with torch.no_grad():
            logits = self.head(hidden)
            if self.arch.softcap is not None:
                c = self.arch.softcap
                logits = torch.tanh(logits / c) * c
        return logits


class WholeModelRouter:
    """Fallback for unrecognised models: the whole model (eval mode, no grad) is the router."""

    def __init__(self, model: nn.Module) -> None:
        self.model = _clone_tree(model)
        self.model.train(False)

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **rows)
        if isinstance(out, Tensor):
            return out
        return out.logits if hasattr(out, "logits") else out[0]


def build_router(
    model: nn.Module, num_layers: int, user_router: Optional[Callable[..., Tensor]] = None,
    strict: bool = False,
) -> tuple[Callable[..., Tensor], bool]:
    """The router for ``model`` and whether the model is causal.

    ``router_layers`` out of range raises; an unrecognised model gets the whole-model router and a
    warning that says why and how to supply a router (an error when ``strict``).
    """
    try:
        arch = describe(model)
    except ValueError as err:
        if user_router is not None:
            return user_router, not _looks_masked(model)
        fall_back(
            f"cggr: {err}; the whole model is used as the router, which costs a full extra forward "
            "pass. Pass router=callable(input_ids, attention_mask) -> logits to avoid it.",
            strict, stacklevel=3,
        )
        return WholeModelRouter(model), not _looks_masked(model)
    if user_router is not None:
        return user_router, arch.causal
    if not 1 <= num_layers < arch.num_layers:
        raise ValueError(
            f"router_layers={num_layers} is out of range for this {arch.model_type} model with "
            f"{arch.num_layers} layers: use 1 <= router_layers < {arch.num_layers}."
        )
    if arch.model_type not in SUPPORTED_ARCHITECTURES:
        warnings.warn(
            f"cggr: {arch.model_type} is not among the tested architectures; its router runs the "
            f"first {num_layers} layers through the base model's own forward. If its logits look "
            "wrong, pass router=callable(input_ids, attention_mask) -> logits.",
            stacklevel=3,
        )
    return TruncatedRouter(model, num_layers, arch), arch.causal
