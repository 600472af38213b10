"""Pass (analysis only): the traced step holds the fused loss op exactly when it was chosen.

Precondition: a routed step graph (``trace_routed_step``) of a core whose ``fused_loss`` is the
choice of ``passes/fuse_loss.py:choose_fused_loss`` (made once, before the trace: the main pass then
runs the base model and ``cggr::fused_linear_cross_entropy`` on its hidden states).
Guarantees: no node changes. ``gm.meta["cggr_fused_loss"]`` is the choice's reason ("fused: ..."
or why not); a graph with another number of fused loss nodes than the choice implies (one when
chosen, none otherwise) raises ``AssertionError``: the trace and the choice disagree.
"""

from __future__ import annotations

import torch.fx as fx

from cggr_compile.passes.fuse_loss import FusedLoss, fused_loss_nodes
from cggr_compile.passes.pass_context import PassContext, record_pass


def check_fused_loss(gm: fx.GraphModule, choice: FusedLoss) -> str:
    """Check the traced step against the choice and record it in ``gm.meta["cggr_fused_loss"]``."""
    nodes = fused_loss_nodes(gm)
    if bool(choice) != (len(nodes) == 1) or len(nodes) > 1:
        raise AssertionError(f"fuse_loss: chose {choice.reason!r} but the traced step has {len(nodes)} "
                             "fused loss nodes")
    gm.meta["cggr_fused_loss"] = choice.reason
    return choice.reason


def check_fused_loss_pass(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    """Pipeline entry: :func:`check_fused_loss` for the core's choice (the graph is unchanged)."""
    reason = check_fused_loss(gm, context.core.fused_loss)
    record_pass(gm, "check_fused_loss", reason, changed=False)
    return gm
