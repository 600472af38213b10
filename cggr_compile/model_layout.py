"""How a model is laid out and called: the two descriptions that the configuration
(``cggr_compile.config``) holds and the router (``cggr_compile.router``) reads.

They live here, apart from both, so that neither module imports the other; no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelCall:
    """How the wrapped model is called and what it returns; the defaults are Hugging Face's.

    ``cggr_compile.router.model_call_for`` infers it from the model (Hugging Face, or the nanoGPT,
    torchtitan and litgpt layouts that ``detect_router_spec`` finds); pass ``model_call=`` where
    that guess is wrong. CGGR reads every convention through this one object: the transform's
    ``forward``, its main pass and the backend's reading of the captured call.

    Attributes:
        inputs: name of the forward's token argument (nanoGPT ``idx``, torchtitan ``tokens``).
            Passed positionally to the model or by this name, both work.
        labels: name of the forward's label argument (nanoGPT ``targets``); None when the forward
            takes no labels (torchtitan computes its loss outside the model): then CGGR takes them
            as ``labels=`` and computes the loss itself.
        attention_mask: name of the forward's mask argument; None when it takes none (a mask given
            to CGGR then only marks positions out of the scores and the loss).
        labels_shifted: the labels are already aligned with the positions (``labels[:, t]`` is what
            position ``t`` predicts: nanoGPT's and torchtitan's ``y = x[1:]``); False: CGGR shifts
            them like a Hugging Face causal LM's loss.
        ignore_index: the label value that marks no target (nanoGPT uses -1).
        labels_to_model: the main pass also passes the selected rows' labels to the model (nanoGPT
            computes every position's logits only when given targets; its own loss is not used).
        logits_module: dotted path of the submodule whose ``forward(tokens)`` gives the logits (the
            main pass calls it so, without labels) when the model itself returns only a loss (a
            wrapper that computes its loss outside the language model, as torchtitan's training
            step does); None: the model itself.
        logits_index: the model returns a tuple with the logits at this index (nanoGPT: 0); None:
            a Hugging Face output with ``.logits``, or the bare logits tensor.
        loss_index: where CGGR puts its loss in the tuple it returns in training (nanoGPT: 1).
    """

    inputs: str = "input_ids"
    labels: Optional[str] = "labels"
    attention_mask: Optional[str] = "attention_mask"
    labels_shifted: bool = False
    ignore_index: int = -100
    labels_to_model: bool = False
    logits_module: Optional[str] = None
    logits_index: Optional[int] = None
    loss_index: Optional[int] = None

    @property
    def is_hugging_face(self) -> bool:
        return self == ModelCall()

    def aliases(self) -> dict[str, str]:
        """The model's argument names -> CGGR's (``input_ids``, ``attention_mask``, ``labels``)."""
        names = {self.inputs: "input_ids"}
        if self.labels is not None:
            names[self.labels] = "labels"
        if self.attention_mask is not None:
            names[self.attention_mask] = "attention_mask"
        return {k: v for k, v in names.items() if k != v}

    def canonical(self, kwargs: dict) -> dict:
        """``kwargs`` of a model call with CGGR's names for the inputs, labels and mask."""
        aliases = self.aliases()
        return {aliases.get(k, k): v for k, v in kwargs.items()}


@dataclass(frozen=True)
class RouterSpec:
    """Where a model that is not Hugging Face's keeps the pieces of the truncated router, and how a
    block is called. Paths are dotted attribute paths from the model given to CGGR.

    The router computes ``head(norm(blocks[K-1](...blocks[0](embed(ids), *args)...)))``: the
    model's own modules, in eval mode, under no-grad. :func:`detect_router_spec` fills it in for
    the nanoGPT, torchtitan and litgpt layouts; pass ``router_spec=RouterSpec(...)`` for others.

    Attributes:
        embedding: the token embedding (nanoGPT ``transformer.wte``, torchtitan ``tok_embeddings``).
        blocks: the ``ModuleList`` (or ``ModuleDict``, in its order) of blocks (``transformer.h``,
            ``layers``); the router runs the first ``router_layers`` of them.
        norm: the final norm (``transformer.ln_f``, ``norm``); None when the model has none.
        head: the output head (``lm_head``, ``output``).
        position_embedding: a learned position embedding added to the token embedding, looked up
            at ``0..T-1`` (nanoGPT ``transformer.wpe``); None for rotary models.
        block_args: tensors passed positionally to every block after the hidden state, each cut to
            its first ``T`` rows (rotary tables: torchtitan ``freqs_cis``, litgpt ``cos``, ``sin``).
        embedding_scale: the embedding is multiplied by this (litgpt's ``scale_embeddings``).
        softcap: final logit soft-capping ``tanh(z / c) * c``, part of the head.
        causal: a causal LM (False: a masked LM, scored without a shift).
        layout: the layout's name (``nanogpt``, ``torchtitan``, ``litgpt``, ``custom``).
        root: dotted path of the module the layout sits in ('' is the model itself; a wrapper that
            computes its loss outside the language model holds it as, say, ``model``).
    """

    embedding: str
    blocks: str
    norm: Optional[str]
    head: str
    position_embedding: Optional[str] = None
    block_args: tuple[str, ...] = ()
    embedding_scale: Optional[float] = None
    softcap: Optional[float] = None
    causal: bool = True
    layout: str = "custom"
    root: str = ""
