"""Test helpers for the passes: capture Dynamo's graph of a model call, as the cggr backend
receives it; the row counts that reach the backward graph of a rewritten step."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from cggr_compile.backend import _captured_frame


def capture(model, **call):
    got = {}

    def backend(gm, example_inputs, **_):
        if "gm" not in got:
            module, kwargs = _captured_frame(example_inputs)
            got.update(gm=gm, example_inputs=list(example_inputs), kwargs=kwargs, module=module)
        return gm.forward

    torch.compile(model, backend=backend)(**call)
    return got


# Analysis for the tests (the library does not use it): with batch slicing, the full batch size B
# must not be among the leading dims of the backward graph, only the k selected rows are
# differentiated (the router, which sees all B rows, runs under no-grad and saves nothing).
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
