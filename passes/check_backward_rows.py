"""Pass (analysis only): the row counts that reach the backward graph of a rewritten step.

Precondition: a rewritten step graph (``trace_routed_step``) and example inputs.
Guarantees: returns the set of leading dimensions of every tensor the AOTAutograd backward graph
receives or computes, without changing the graph. With batch slicing, the full batch size ``B``
must not be among them: only the ``k`` selected rows are differentiated (the router, which sees
all ``B`` rows, runs under no-grad and saves nothing for backward).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx


def backward_leading_dims(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> set[int]:
    """Leading dims of all tensors in the backward graph AOTAutograd builds for ``gm``."""
    from functorch.compile import aot_module_simplified, make_boxed_func

    seen: set[int] = set()

    def forward_compiler(fw: fx.GraphModule, _: Any) -> Any:
        return make_boxed_func(fw.forward)

    def backward_compiler(bw: fx.GraphModule, _: Any) -> Any:
        for node in bw.graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                seen.add(int(val.shape[0]))
        return make_boxed_func(bw.forward)

    compiled = aot_module_simplified(gm, list(example_inputs), fw_compiler=forward_compiler,
                                     bw_compiler=backward_compiler)
    outs = compiled(*example_inputs)
    outs[0].backward()
    return seen
