"""Architecture adapters and the truncated router.

The router is the model's own first K layers, its final norm and its output head, run without
gradient and without dropout. It is built as a *shallow clone* of the base model: a parallel tree
of module objects that hold the very same ``Parameter`` and buffer tensors (nothing is copied), with
the layer list cut to K and every clone in eval mode. The clone is never registered as a
submodule, so ``model.parameters()`` and ``state_dict()`` are unchanged; and because the clone runs
the base model's own ``forward`` (embeddings, scaling, rotary, masks, final norm), its logits are
exactly ``head(final_norm(hidden_after_K_layers))`` for every architecture that follows the Hugging
Face layout (``base_model`` + a ``ModuleList`` of layers + a head beside the base model).

Models that are not Hugging Face's (nanoGPT, torchtitan, litgpt) have no base model to run: a
declarative :class:`RouterSpec` names their embedding, blocks, final norm and head and how a block
is called; :func:`detect_router_spec` finds the common layouts, and :class:`SpecRouter` runs them.
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
from .model_layout import ModelCall, RouterSpec

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


# Keys of a clone's __dict__ that are its own, never the original's: its children, its mode, the
# original it mirrors, how many children it keeps (a truncated layer list) and pinned attributes.
_SOURCE, _KEEP, _PINNED = "_cggr_source", "_cggr_keep", "_cggr_pinned"
_CLONE_OWN = frozenset({"_modules", "training", _SOURCE, _KEEP, _PINNED})
_MISSING = object()


def _clone_tree(module: nn.Module, keep: Optional[int] = None) -> nn.Module:
    """A new module object per node, with its own ``training`` flag and child list (the first
    ``keep`` children only, when given).

    The parameter and buffer *dicts* are the originals' (not copies): whatever replaces a tensor in
    the model (FSDP2 swapping sharded and unsharded parameters, ``load_state_dict(assign=True)``,
    ``to_empty``) is seen by the router too. Hooks are shared the same way. Every other attribute
    (PEFT's active adapter, a disabled adapter, a merge, a flag a user toggles) is copied, so
    :func:`refresh_clone` brings it up to date before each routed step.
    """
    clone = object.__new__(type(module))  # no __init__ and no __reduce__ (FSDP2's classes define one)
    clone.__dict__ = dict(module.__dict__)
    children = list(module._modules.items())[:keep] if keep is not None else module._modules.items()
    clone._modules = {n: (_clone_tree(c) if c is not None else None) for n, c in children}
    clone.__dict__[_SOURCE] = module
    if keep is not None:
        clone.__dict__[_KEEP] = keep
    return clone


def refresh_clone(clone: nn.Module) -> None:
    """Make a clone tree of :func:`_clone_tree` score with its originals' live state.

    Attributes follow the original's (adding, replacing and removing them; pinned ones stay); a
    child the original replaced (PEFT injecting or unloading LoRA layers, a new adapter's modules)
    is cloned afresh, in eval mode. Only attributes whose object changed are written, so a
    compiled router sees no change (and recompiles on none) while the model's state stays put.
    """
    src = clone.__dict__.get(_SOURCE)
    if src is None:  # a container the router built (a list of clones)
        for child in clone._modules.values():
            if child is not None:
                refresh_clone(child)
        return
    mine, theirs = clone.__dict__, src.__dict__
    pinned = mine.get(_PINNED, ())
    for key, value in theirs.items():
        if key not in _CLONE_OWN and key not in pinned and mine.get(key, _MISSING) is not value:
            mine[key] = value
    for key in [k for k in mine if k not in theirs and k not in _CLONE_OWN and k not in pinned]:
        del mine[key]
    keep = mine.get(_KEEP)
    wanted = list(src._modules.items())[:keep] if keep is not None else list(src._modules.items())
    children = mine["_modules"]
    if [n for n, _ in wanted] != list(children):
        children = mine["_modules"] = {n: children.get(n) for n, _ in wanted}
    for name, child in wanted:
        have = children[name]
        if child is None:
            children[name] = None
        elif have is None or have.__dict__.get(_SOURCE) is not child:
            children[name] = _clone_tree(child).train(False)
        else:
            refresh_clone(have)


class _Clones:
    """The clone trees of one router, with each original's attributes and children as of the last
    sync: the check before each step is two dict comparisons per module, in C (identical values
    compare equal without calling ``__eq__``), and only a change walks the trees."""

    def __init__(self, roots: list[nn.Module]) -> None:
        self.roots = roots
        self._index()

    def _index(self) -> None:
        self.entries = []
        for root in self.roots:
            for clone in root.modules():
                src = clone.__dict__.get(_SOURCE)
                if src is not None:
                    self.entries.append((src, dict(src.__dict__), dict(src._modules)))

    def changed(self) -> bool:
        try:
            return any(src.__dict__ != attrs or src._modules != kids for src, attrs, kids in self.entries)
        except Exception:  # noqa: BLE001 - a value whose == is not a bool (a tensor): walk the trees
            return True

    def refresh(self) -> None:
        if self.changed():
            for root in self.roots:
                refresh_clone(root)
            self._index()


def unwrap_peft(model: nn.Module) -> nn.Module:
    """A PEFT ``PeftModel``'s underlying model (its LoRA layers inside), whose first layers the
    router runs; any other model unchanged."""
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def refresh_router(router: Any) -> None:
    """Bring a router's clones up to date with the model (before each routed step); a user's
    router (no clones) is left alone."""
    if type(router).__module__ != __name__:  # a user's router: its state is its own
        return
    refresh = getattr(router, "refresh", None)
    if callable(refresh):
        refresh()
        return
    clones = router.__dict__.get("_cggr_clones")
    if clones is None:
        roots = [v for v in vars(router).values() if isinstance(v, nn.Module)
                 and (_SOURCE in v.__dict__ or (isinstance(v, nn.ModuleList) and all(
                     c is None or _SOURCE in c.__dict__ for c in v._modules.values())))]
        clones = router.__dict__["_cggr_clones"] = _Clones(roots)
    clones.refresh()


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


class _HeadRouter:
    """What both truncated routers share: ``hidden`` (the final-normed state after K layers, given
    by each) scored with the model's own head, soft-capped like the model's logits."""

    head: nn.Module

    @property
    def softcap(self) -> Optional[float]:
        raise NotImplementedError

    def hidden(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        raise NotImplementedError

    @property
    def linear_head(self) -> Optional[nn.Linear]:
        """The head when it is one linear layer (then it can be fused with the scoring)."""
        return self.head if type(self.head) is nn.Linear else None

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        hidden = self.hidden(input_ids, attention_mask, **rows)
        with torch.no_grad():
            logits = self.head(hidden)
            c = self.softcap
            if c is not None:
                logits = torch.tanh(logits / c) * c
        return logits


class TruncatedRouter(_HeadRouter):
    """``(input_ids, attention_mask, **row_inputs) -> logits [B, T, V]`` from the first K layers.

    Deliberately not an ``nn.Module``: it must never become a submodule (that would add its
    tensors to ``parameters()`` / ``state_dict()`` a second time).
    """

    def __init__(self, model: nn.Module, num_layers: int, arch: Architecture) -> None:
        self.arch = arch
        self.num_layers = num_layers
        self._model = model  # read at refresh (the head, the base model, the config)
        self._build()

    def _build(self) -> None:
        model, arch = self._model, self.arch
        base = getattr(model, arch.base_name)
        self.base = _clone_tree(base)
        parent_path, _, list_name = arch.layers_name.rpartition(".")
        parent = self.base.get_submodule(parent_path) if parent_path else self.base
        original_list = base.get_submodule(arch.layers_name)
        parent._modules[list_name] = _clone_tree(original_list, keep=self.num_layers)
        self._live_config = model.config
        self._config = cfg = _truncated_config(model.config, self.num_layers)
        for m in self.base.modules():
            if getattr(m, "config", None) is model.config:
                m.config = cfg
                m.__dict__[_PINNED] = ("config",)  # the truncated config, kept up to date by refresh
        # The router scores in eval mode: no dropout, whatever the model's mode.
        self.base.train(False)
        self.head = getattr(model, arch.head_name)
        self._clones = _Clones([self.base])
        self._config_seen = dict(vars(model.config))

    def refresh(self) -> None:
        """Score with the model's live state: its base model's attributes and children (see
        :func:`refresh_clone`), its head and its config (all but the truncated depth)."""
        model = self._model
        if self.base.__dict__.get(_SOURCE) is not getattr(model, self.arch.base_name) \
                or model.config is not self._live_config:
            self._build()
            return
        self._clones.refresh()
        self.head = getattr(model, self.arch.head_name)
        live = vars(self._live_config)
        try:
            same = live == self._config_seen
        except Exception:  # noqa: BLE001 - a value whose == is not a bool
            same = False
        if not same:
            cfg, depth_keys = self._config, ("num_hidden_layers", "n_layer", "num_layers", "layer_types")
            for key, value in live.items():
                if key not in depth_keys and cfg.__dict__.get(key, _MISSING) is not value:
                    cfg.__dict__[key] = value
            self._config_seen = dict(live)

    def hidden(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        """The final-normed hidden state after K layers, ``[B, T, H]`` (no grad)."""
        kwargs = dict(rows)
        if self.arch.base_accepts_use_cache:
            kwargs["use_cache"] = False
        with torch.no_grad():
            return self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]

    @property
    def softcap(self) -> Optional[float]:
        return self.arch.softcap


def _get(model: nn.Module, path: str) -> Any:
    """The attribute at a dotted path (modules, parameters and plain tensors alike)."""
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _block_list(blocks: Any) -> Optional[list[nn.Module]]:
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    if isinstance(blocks, nn.ModuleDict):  # torchtitan: keyed "0", "1", ... in insertion order
        return list(blocks.values())
    return None


def detect_router_spec(model: nn.Module) -> Optional[RouterSpec]:
    """The :class:`RouterSpec` of a nanoGPT, litgpt or torchtitan style model, or None.

    Looks at the model and then its submodules (outermost first), so a wrapper module that holds
    the language model and computes the loss is found too:

    - nanoGPT: ``transformer.wte``, ``transformer.wpe``, ``transformer.h``, ``transformer.ln_f``,
      ``lm_head``;
    - litgpt: the same without ``wpe``, blocks called as ``block(x, cos, sin)`` with the model's
      ``cos`` / ``sin`` rotary buffers;
    - torchtitan Llama: ``tok_embeddings``, ``layers`` (ModuleDict or ModuleList), ``norm``,
      ``output``, blocks called as ``block(h, freqs_cis)``.
    """
    for path, m in model.named_modules():
        p = f"{path}." if path else ""
        t = getattr(m, "transformer", None)
        if isinstance(t, nn.Module) and isinstance(getattr(m, "lm_head", None), nn.Module) \
                and all(isinstance(getattr(t, n, None), nn.Module) for n in ("wte", "ln_f")) \
                and _block_list(getattr(t, "h", None)):
            if isinstance(getattr(t, "wpe", None), nn.Module):
                return RouterSpec(f"{p}transformer.wte", f"{p}transformer.h", f"{p}transformer.ln_f",
                                  f"{p}lm_head", position_embedding=f"{p}transformer.wpe", layout="nanogpt",
                                  root=path)
            rope = tuple(n for n in ("cos", "sin") if isinstance(getattr(m, n, None), Tensor))
            cfg = getattr(m, "config", None)
            scale = float(cfg.n_embd) ** 0.5 if getattr(cfg, "scale_embeddings", False) else None
            cap = getattr(cfg, "final_logit_softcapping", None)
            return RouterSpec(f"{p}transformer.wte", f"{p}transformer.h", f"{p}transformer.ln_f",
                              f"{p}lm_head", block_args=tuple(f"{p}{n}" for n in rope), embedding_scale=scale,
                              softcap=float(cap) if cap else None, layout="litgpt", root=path)
        if all(isinstance(getattr(m, n, None), nn.Module) for n in ("tok_embeddings", "norm", "output")) \
                and _block_list(getattr(m, "layers", None)):
            rope = ("freqs_cis",) if isinstance(getattr(m, "freqs_cis", None), Tensor) else ()
            return RouterSpec(f"{p}tok_embeddings", f"{p}layers", f"{p}norm", f"{p}output",
                              block_args=tuple(f"{p}{n}" for n in rope), layout="torchtitan", root=path)
    return None


class SpecRouter(_HeadRouter):
    """The truncated router of a :class:`RouterSpec` model: ``(input_ids, ...) -> logits [B, T, V]``.

    Like :class:`TruncatedRouter` it holds shallow clones (eval mode, the same tensors) of the
    embedding, the first K blocks and the norm, and the model's own head; the block arguments
    (rotary tables) are read from the model at each call, so whatever replaces them is seen.
    Not an ``nn.Module``, for the same reason.
    """

    def __init__(self, model: nn.Module, num_layers: int, spec: RouterSpec) -> None:
        self.spec = spec
        self.num_layers = num_layers
        self.model = model  # for the block arguments, read live
        self.embedding = _clone_tree(_get(model, spec.embedding))
        self.position_embedding = (
            _clone_tree(_get(model, spec.position_embedding)) if spec.position_embedding else None
        )
        self.blocks = nn.ModuleList([_clone_tree(b) for b in _block_list(_get(model, spec.blocks))[:num_layers]])
        self.norm = _clone_tree(_get(model, spec.norm)) if spec.norm else None
        for m in (self.embedding, self.position_embedding, self.blocks, self.norm):
            if m is not None:
                m.train(False)  # no dropout in the router, whatever the model's mode
        self.head = _get(model, spec.head)

    @property
    def softcap(self) -> Optional[float]:
        return self.spec.softcap

    def hidden(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        """The final-normed hidden state after K blocks, ``[B, T, H]`` (no grad). The mask and
        per-row inputs are not the blocks' (these models take none): they only mark positions."""
        t = input_ids.shape[1]
        with torch.no_grad():
            h = self.embedding(input_ids)
            if self.spec.embedding_scale is not None:
                h = h * torch.tensor(self.spec.embedding_scale, dtype=h.dtype)
            if self.position_embedding is not None:
                h = h + self.position_embedding(torch.arange(t, device=input_ids.device))
            args = [_get(self.model, name)[:t] for name in self.spec.block_args]
            for block in self.blocks:
                h = block(h, *args)
            return self.norm(h) if self.norm is not None else h


def _check_spec(model: nn.Module, spec: RouterSpec) -> int:
    """The number of blocks of a spec'd model; a path that names nothing is an error that says so."""
    for field_name in ("embedding", "blocks", "norm", "head", "position_embedding"):
        path = getattr(spec, field_name)
        if path is None:
            continue
        try:
            value = _get(model, path)
        except AttributeError:
            value = None
        if not isinstance(value, nn.Module):
            raise ValueError(
                f"router_spec.{field_name}={path!r} names no submodule of {type(model).__name__}; "
                "use the dotted path printed by model.named_modules()."
            )
    blocks = _block_list(_get(model, spec.blocks))
    if blocks is None:
        raise ValueError(
            f"router_spec.blocks={spec.blocks!r} is a {type(_get(model, spec.blocks)).__name__}, "
            "not the ModuleList / ModuleDict of the model's blocks."
        )
    for path in spec.block_args:
        try:
            ok = isinstance(_get(model, path), Tensor)
        except AttributeError:
            ok = False
        if not ok:
            raise ValueError(f"router_spec.block_args: {path!r} names no tensor of {type(model).__name__}.")
    return len(blocks)


def model_call_for(model: nn.Module, given: Optional[Any] = None,
                   spec: Optional[RouterSpec] = None) -> Any:
    """The :class:`~cggr_compile.model_layout.ModelCall` for ``model``: ``given``, else inferred.

    Hugging Face models (a ``base_model`` and a forward with ``input_ids``) get Hugging Face's.
    Otherwise the forward's first argument is the tokens, ``labels`` / ``targets`` the labels, and
    the layout (``spec``, else :func:`detect_router_spec`) says the rest: nanoGPT returns
    ``(logits, loss)``, needs its targets for every position's logits, and takes pre-shifted
    targets with -1 as ignore index; torchtitan returns logits and takes pre-shifted labels (its
    loss is outside the model); litgpt returns logits and shifts its labels in the loss.
    """
    if given is not None:
        return given
    # A PeftModel passes its arguments through to the model inside: that model's names count.
    inner = unwrap_peft(model)
    prefix = "" if inner is model else next(n for n, m in model.named_modules() if m is inner) + "."
    model = inner
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return ModelCall()
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if "input_ids" in params or not named:  # Hugging Face's names, or a wrapper's (*args, **kwargs)
        return ModelCall()
    spec = spec if spec is not None else detect_router_spec(model)
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    inputs = positional[0] if positional else "input_ids"
    labels = next((n for n in ("labels", "targets") if n in params), None)
    mask = "attention_mask" if "attention_mask" in params else None
    layout = spec.layout if spec is not None else "custom"
    logits_module = prefix + spec.root if spec is not None and spec.root else None
    if layout == "nanogpt":
        return ModelCall(inputs, labels, mask, labels_shifted=True, ignore_index=-1, labels_to_model=True,
                         logits_module=logits_module, logits_index=0, loss_index=1)
    # Without its labels a model may return less than every position's logits (nanoGPT does): pass
    # them where it takes them, unless a logits module (a wrapper's language model) gives the logits.
    return ModelCall(inputs, labels, mask, labels_shifted=layout == "torchtitan",
                     labels_to_model=labels is not None and logits_module is None, logits_module=logits_module)


class WholeModelRouter:
    """Fallback for unrecognised models: the whole model (eval mode, no grad) is the router."""

    def __init__(self, model: nn.Module, call: Optional[Any] = None) -> None:
        self.model = _clone_tree(model)
        self.model.train(False)
        self.call = call  # a ModelCall that is not Hugging Face's: the model is called by its names

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        with torch.no_grad():
            if self.call is not None and not self.call.is_hugging_face:
                kwargs = {self.call.inputs: input_ids}
                if self.call.attention_mask is not None and attention_mask is not None:
                    kwargs[self.call.attention_mask] = attention_mask
                out = self.model(**kwargs)
                if isinstance(out, tuple):
                    return out[self.call.logits_index or 0]
            else:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, **rows)
        if isinstance(out, Tensor):
            return out
        return out.logits if hasattr(out, "logits") else out[0]


def _spec_router(model: nn.Module, num_layers: int, spec: RouterSpec) -> SpecRouter:
    depth = _check_spec(model, spec)
    if not 1 <= num_layers < depth:
        raise ValueError(
            f"router_layers={num_layers} is out of range for this {spec.layout} model with {depth} "
            f"blocks ({spec.blocks}): use 1 <= router_layers < {depth}."
        )
    return SpecRouter(model, num_layers, spec)


def build_router(
    model: nn.Module, num_layers: int, user_router: Optional[Callable[..., Tensor]] = None,
    strict: bool = False, spec: Optional[RouterSpec] = None,
) -> tuple[Callable[..., Tensor], bool]:
    """The router for ``model`` and whether the model is causal.

    ``spec`` (or, for a model that is not Hugging Face's, the layout :func:`detect_router_spec`
    finds) builds the truncated router from the named modules. ``router_layers`` out of range
    raises; an unrecognised model gets the whole-model router and a warning that says why and how
    to supply a router (an error when ``strict``).
    """
    model = unwrap_peft(model)  # a PeftModel: the truncated router of the model inside, LoRA and all
    if spec is not None:
        if user_router is not None:
            return user_router, spec.causal
        return _spec_router(model, num_layers, spec), spec.causal
    try:
        arch = describe(model)
    except ValueError as err:
        found = detect_router_spec(model)
        if user_router is not None:
            return user_router, found.causal if found is not None else not _looks_masked(model)
        if found is not None:
            return _spec_router(model, num_layers, found), found.causal
        fall_back(
            f"cggr: {err}, nor a nanoGPT, litgpt or torchtitan layout; the whole model is used as "
            "the router, which costs a full extra forward pass. Pass router=callable(input_ids, "
            "attention_mask) -> logits, or router_spec=cggr_compile.RouterSpec(embedding=..., "
            "blocks=..., norm=..., head=...) with the dotted paths of its token embedding, block "
            "list, final norm and head, to avoid it.",
            strict, stacklevel=3,
        )
        return WholeModelRouter(model, model_call_for(model)), not _looks_masked(model)
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


class TruncatedRouterModule(nn.Module):
    """:func:`cggr_compile.create_truncated_router`'s router: an ``nn.Module`` view of a
    :class:`TruncatedRouter`, for code written against the original library's router module.

    It owns no parameter, buffer or submodule and copies nothing; the model is not told about it
    (``model.parameters()`` and ``model.state_dict()`` are unchanged). What it exposes are the
    model's own tensors that the router runs: the base model without its layers past the first
    ``num_layers`` (token and position embeddings, the first K layers, the final norm, rotary
    tables) and the output head, named as in the model's ``state_dict`` (``model.layers.0...``,
    ``lm_head.weight``), each tensor once (a tied head is the embedding's weight).

    * ``router(input_ids, attention_mask=None, **row_inputs)``: the logits ``[B, T, V]`` of the
      first K layers, under no-grad; ``hidden(...)``, ``head``, ``linear_head``, ``softcap``,
      ``num_layers``, ``arch`` and ``base`` are the wrapped :class:`TruncatedRouter`'s.
    * ``parameters()`` / ``named_parameters()`` / ``buffers()`` / ``named_buffers()``: the model's
      tensor objects themselves (``is``-identical), so an optimizer over ``router.parameters()``
      steps the model's weights, and ``router.requires_grad_(False)`` or ``zero_grad()`` act on
      the model's tensors too. ``recurse=False`` yields nothing: none of them is the router's own.
    * ``state_dict()``: those tensors under the model's own keys (a subset of
      ``model.state_dict()``); ``load_state_dict()`` loads them into the model. As a submodule of
      another module (``destination=`` given by the parent's ``state_dict``) it adds nothing, since
      the tensors belong to the model and are saved with it, and the parent's ``parameters()``
      gets none of them either: nothing is registered twice.
    * ``.to(device)``, ``.cuda()``, ``.cpu()``: the tensors are the model's, and moving only the
      router's share of them would split the model across devices, so a move applies to the
      **whole model** (as ``model.to(...)`` with the same arguments would); already there, it is a
      no-op. A dtype change of the shared parameters (``.half()``, ``.to(torch.bfloat16)`` on a
      float32 model) raises ``TypeError``: it would convert the model's own weights, which the user
      trains; convert the model itself, or run the router under ``torch.autocast``. A dtype the
      parameters already have is accepted (``router.to(model.dtype)``).
    * ``eval()`` / ``train()`` set this module's ``training`` flag and nothing else: the model's
      mode is left alone, and the router always scores in eval mode (no dropout), whatever the
      flag, as the router of ``cggr_compile.transform`` does.
    """

    def __init__(self, router: TruncatedRouter, model: Optional[nn.Module] = None) -> None:
        super().__init__()
        # Plain attributes, not submodules: nothing of the model is registered here.
        self.__dict__["_cggr_router"] = router
        self.__dict__["_cggr_model"] = model if model is not None else router._model

    # -- the router ---------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        """The router's logits ``[B, T, V]`` (no grad, eval mode)."""
        with torch.no_grad():
            return self._cggr_router(input_ids, attention_mask, **rows)

    def hidden(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **rows: Any) -> Tensor:
        """The final-normed hidden state after K layers, ``[B, T, H]`` (no grad)."""
        return self._cggr_router.hidden(input_ids, attention_mask, **rows)

    def refresh(self) -> None:
        """Follow the model's live state (see :meth:`TruncatedRouter.refresh`)."""
        self._cggr_router.refresh()

    @property
    def router(self) -> TruncatedRouter:
        """The wrapped :class:`TruncatedRouter`."""
        return self._cggr_router

    @property
    def head(self) -> nn.Module:
        return self._cggr_router.head

    @property
    def linear_head(self) -> Optional[nn.Linear]:
        return self._cggr_router.linear_head

    @property
    def softcap(self) -> Optional[float]:
        return self._cggr_router.softcap

    @property
    def num_layers(self) -> int:
        return self._cggr_router.num_layers

    @property
    def arch(self) -> Architecture:
        return self._cggr_router.arch

    @property
    def base(self) -> nn.Module:
        return self._cggr_router.base

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_cggr_router")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return (f"{self.arch.model_type}, num_layers={self.num_layers}, shared parameters={n} "
                "(the model's own)")

    # -- the model's tensors that the router runs ---------------------------------------------
    def _roots(self) -> list[tuple[str, nn.Module]]:
        """``(name in the model, module)``: the truncated base model (shallow clones whose
        parameter and buffer dicts are the model's) and the model's head."""
        r = self._cggr_router
        return [(r.arch.base_name, r.base), (r.arch.head_name, r.head)]

    def _named(self, kind: str, prefix: str, recurse: bool, remove_duplicate: bool) -> Any:
        if not recurse:
            return
        seen: set[int] = set()
        p = f"{prefix}." if prefix else ""
        for root_name, root in self._roots():
            for name, t in getattr(root, kind)(prefix=p + root_name, remove_duplicate=remove_duplicate):
                if remove_duplicate:
                    if id(t) in seen:
                        continue
                    seen.add(id(t))
                yield name, t

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Any:
        return self._named("named_parameters", prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any:
        return self._named("named_buffers", prefix, recurse, remove_duplicate)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        if args or destination is not None:
            # A parent module's state_dict recursing into this one (or the old positional form):
            # the tensors are the model's and saved with it, so none is added a second time.
            return destination
        from collections import OrderedDict

        out: Any = OrderedDict()
        out._metadata = OrderedDict()
        for root_name, root in self._roots():
            root.state_dict(destination=out, prefix=f"{prefix}{root_name}.", keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load the router's entries (the model's keys, as :meth:`state_dict` gives them) into the
        model's tensors."""
        from torch.nn.modules.module import _IncompatibleKeys

        own = list(self.state_dict(keep_vars=True))
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in set(own)]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected} (the router's keys are the model's own, e.g. {own[:2]})"
            )
        sub = {k: v for k, v in state_dict.items() if k not in unexpected}
        for root_name, root in self._roots():
            p = f"{root_name}."
            root.load_state_dict({k[len(p):]: v for k, v in sub.items() if k.startswith(p)},
                                 strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "TruncatedRouterModule":
        """``to`` / ``cuda`` / ``cpu`` / ``half``...: see the class docstring. Probes ``fn`` on an
        empty tensor of each (dtype, device) of the shared tensors to see what it would change."""
        params = {id(p) for p in self.parameters()}
        kinds: dict[tuple[torch.dtype, torch.device], bool] = {}
        for t in list(self.parameters()) + list(self.buffers()):
            key = (t.dtype, t.device)
            kinds[key] = kinds.get(key, False) or id(t) in params
        moves = False
        for (dtype, device), is_param in kinds.items():
            with torch.no_grad():
                probe = fn(torch.empty(0, dtype=dtype, device=device))
            if is_param and probe.dtype != dtype:
                raise TypeError(
                    f"create_truncated_router: this router shares the model's own parameters, so "
                    f"converting it from {dtype} to {probe.dtype} would convert the model's weights "
                    "(which it trains) as well. Convert the model itself (model.to(dtype)) if that is "
                    "meant, or run the router under torch.autocast to score in lower precision."
                )
            moves = moves or probe.device != device
        if moves:  # the whole model, never a part of it: a model split across devices cannot run
            self._cggr_model._apply(fn)
        return self
