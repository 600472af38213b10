"""What every pass of the pipeline receives besides the graph, and how a pass says what it did.

A pass is ``(gm, context) -> gm`` (:data:`Pass`). It reads what it needs from the
:class:`PassContext` (never from the core's private state) and records what it changed with
:func:`record_pass`, which appends to ``gm.meta["cggr_passes"]`` and logs the line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

if TYPE_CHECKING:  # the core imports the passes (fuse_loss): no import at run time
    from cggr_compile.passes.recognise_training_graph import GraphPlan
    from cggr_compile.schedule import RoutedPlan
    from cggr_compile.transform import CGGRModel

log = logging.getLogger("cggr_compile.passes")

# The meta key of the passes' records: one dict per pass that ran, in order.
PASSES_META = "cggr_passes"


@dataclass(frozen=True)
class PassContext:
    """The inputs of one run of the pipeline: one Dynamo graph, one routed plan.

    ``carry_dynamo_sources``: give the routed graph's placeholders Dynamo's sources (the backend
    does, so AOTAutograd sees the parameters as static inputs; ``explain`` needs not).
    ``autocast_dtype``: the autocast dtype in force for the inputs' device while tracing, if any.
    """

    core: "CGGRModel"
    graph_plan: "GraphPlan"
    routed: "RoutedPlan"
    example_inputs: Sequence[Any]
    call_kwargs: dict
    carry_dynamo_sources: bool = True
    autocast_dtype: Optional[torch.dtype] = None


Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


def record_pass(gm: fx.GraphModule, name: str, summary: str, changed: bool) -> None:
    """Record in ``gm.meta["cggr_passes"]`` (and log) that pass ``name`` ran: whether it changed
    the graph and one line saying what (or why not)."""
    gm.meta.setdefault(PASSES_META, []).append({"pass": name, "changed": changed, "summary": summary})
    log.debug("pass %s: %s%s", name, summary, "" if changed else " (graph unchanged)")
