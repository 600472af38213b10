"""Capture Dynamo's graph of a model call, as the cggr backend receives it."""

from __future__ import annotations

import torch

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
