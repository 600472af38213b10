"""Pass: recognise a Dynamo-captured causal/masked-LM training graph.

Precondition: a torch-level FX graph from Dynamo (placeholders carry ``grapharg`` sources,
nodes carry ``example_value``).
Guarantees: on success, a :class:`GraphPlan` that names which placeholder is ``input_ids``,
``attention_mask``, ``labels`` or another per-row input, which are parameters/buffers, and which
graph output is the loss and which the logits. Otherwise a :class:`NotRewritable` whose message says
why and what the user can do; the graph is left untouched either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

LOSS_TARGETS = ("cross_entropy",)


class NotRewritable(Exception):
    """The graph cannot be rewritten; the message is shown to the user once."""


@dataclass
class GraphPlan:
    batch: int
    # keyword of the model call ("input_ids", "attention_mask", ...) -> placeholder position;
    # two keywords may share one placeholder (labels=input_ids is common).
    inputs: dict[str, int] = field(default_factory=dict)
    # placeholder position -> anything else (parameters, buffers, constants): passed through
    others: list[int] = field(default_factory=list)
    loss_output: int = -1
    logits_output: int = -1
    num_outputs: int = 0


def _source_key(node: fx.Node) -> Optional[str]:
    """``L['kwargs']['input_ids']`` / ``L['input_ids']`` -> ``input_ids``; parameters -> None."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = source.name if isinstance(getattr(source, "name", None), str) else None
    if name is None and source is not None and callable(getattr(source, "name", None)):
        name = source.name()
    if name is None:
        return None
    m = re.fullmatch(r"L\['kwargs'\]\['(\w+)'\]|L\['(\w+)'\]", name)
    if not m:
        return None
    key = m.group(1) or m.group(2)
    return None if key in ("self", "args", "kwargs") else key


def _is_loss_node(node: fx.Node) -> bool:
    return node.op == "call_function" and any(t in str(node.target) for t in LOSS_TARGETS)


def recognise(
    gm: fx.GraphModule, example_inputs: Sequence[Any] = (), call_kwargs: Optional[dict] = None,
    aliases: Optional[dict[str, str]] = None,
) -> GraphPlan:
    """Find inputs, loss and logits of a training graph, or raise :class:`NotRewritable`.

    ``call_kwargs`` (the model call's keyword arguments, when known) map inputs by identity, which
    also finds keywords that Dynamo merged into one placeholder; otherwise the placeholders'
    Dynamo sources name them. ``aliases`` renames the model's argument names to CGGR's
    (``ModelCall.aliases()``: nanoGPT's ``idx`` -> ``input_ids``, ``targets`` -> ``labels``).
    """
    aliases = aliases or {}
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    plan = GraphPlan(batch=-1)
    by_id = {id(t): pos for pos, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)}
    for name, value in (call_kwargs or {}).items():
        if isinstance(value, torch.Tensor) and id(value) in by_id:
            plan.inputs[name] = by_id[id(value)]
    for pos, node in enumerate(placeholders):
        key = _source_key(node)
        key = aliases.get(key, key) if key is not None else None
        if key is not None and key not in plan.inputs:
            plan.inputs[key] = pos
    used = set(plan.inputs.values())
    plan.others = [pos for pos in range(len(placeholders)) if pos not in used]
    names = set(plan.inputs)
    if "input_ids" not in names:
        raise NotRewritable(
            "the captured graph has no input_ids input (a graph break before the model call, or "
            "a fragment such as one split off by DDP's optimize_ddp); call the model with "
            "input_ids=..., or use cggr_compile.transform(model) before torch.compile"
        )
    if "labels" not in names:
        raise NotRewritable("the model was called without labels, so there is no loss to route")
    losses = [n for n in graph.nodes if _is_loss_node(n)]
    if len(losses) != 1:
        raise NotRewritable(
            f"expected one cross-entropy loss in the captured graph, found {len(losses)} (a graph "
            "break before the loss, or a custom loss); for GPT-2 set model.loss_type = "
            "'ForCausalLM', otherwise use cggr_compile.transform(model)"
        )
    loss = losses[0]
    ids_node = placeholders[plan.inputs["input_ids"]]
    ids_val = ids_node.meta.get("example_value")
    if not isinstance(ids_val, torch.Tensor) or ids_val.dim() != 2:
        raise NotRewritable("input_ids is not a (batch, seq) tensor")
    batch = ids_val.shape[0]
    if not isinstance(batch, int):
        raise NotRewritable("the batch dimension is symbolic; compile without dynamic=True")
    plan.batch = batch

    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    plan.num_outputs = len(outs)
    ancestors = _ancestors(loss)
    for i, o in enumerate(outs):
        if not isinstance(o, fx.Node):
            continue
        if o is loss or loss in _ancestors(o):
            plan.loss_output = i
        elif o in ancestors:
            val = o.meta.get("example_value")
            if isinstance(val, torch.Tensor) and val.dim() == 3 and val.shape[0] == batch:
                plan.logits_output = i
    if plan.loss_output < 0:
        raise NotRewritable("the loss is not an output of the captured graph")
    return plan


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen
