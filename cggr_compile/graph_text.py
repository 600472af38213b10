"""Readable, stable text of a rewritten graph (for users, and pinned by snapshot tests)."""

from __future__ import annotations

import torch
import torch.fx as fx

# The ops that show the structure of a CGGR step: where the router ends, what is selected, how
# many rows the main pass runs on, and the loss. Everything else is elided in the summary, grad-mode
# switches too: where transformers puts them (rotary embeddings' no_grad) differs between versions,
# and the summary is pinned on every supported one.
STRUCTURAL_OPS = (
    "embedding", "scaled_dot_product_attention", "log_softmax", "topk", "sort", "index_select",
    "cross_entropy", "fused_token_stats", "exit_fit",
)


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{str(val.dtype).replace('torch.', '')}[{dims}]"
    return ""


def _target(node: fx.Node) -> str:
    t = node.target
    name = getattr(t, "__name__", None) if not isinstance(t, torch._ops.OpOverload) else None
    return name or str(t).replace("aten.", "").replace(".default", "")


def graph_text(gm: fx.GraphModule, full: bool = False) -> str:
    """One line per node (``full``) or per structural node, with normalised names and shapes."""
    if full:
        return gm.print_readable(print_output=False)
    lines = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(op in _target(node) for op in STRUCTURAL_OPS):
            args = ", ".join(str(a) for a in node.args if not isinstance(a, fx.Node))
            shape = _shape(node)
            lines.append(f"{_target(node)}({args})" + (f" -> {shape}" if shape else ""))
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            lines.append("return " + ", ".join(_shape(o) for o in outs if isinstance(o, fx.Node)))
    return "\n".join(lines)
