"""The pass pipeline of the cggr backend: one ordered list, one driver.

:data:`PASSES` is the order, in one place (``passes/README.md`` states each pass's contract and the
invariants every pass keeps). Every entry is a :data:`~cggr_compile.passes.pass_context.Pass`,
``(gm, context) -> gm``: the first takes Dynamo's graph and returns the routed step, the others
take and return that step. :func:`run_passes` runs them in order; each records what it changed in
``gm.meta["cggr_passes"]`` (and its own key: ``cggr_fuse_scorer``, ``cggr_fused_loss``) and logs it
on the ``cggr_compile.passes`` logger (debug level).

Debug switch: ``CGGR_DUMP_PASSES=1`` prints the graph after every pass to stderr;
``CGGR_DUMP_PASSES=<dir>`` writes it to ``<dir>/<n>_<pass>.txt`` instead.

Not in the list: ``passes/recognise_training_graph.py:recognise``, the analysis that reads Dynamo's
graph into the ``GraphPlan`` every pass here receives. It runs once per captured graph, before the
backend decides whether to rewrite it at all; the pipeline runs once per routed plan, lazily.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import torch.fx as fx

from cggr_compile.passes.check_fused_loss import check_fused_loss_pass
from cggr_compile.passes.fuse_scorer import fuse_scorer_pass
from cggr_compile.passes.pass_context import PASSES_META, Pass, PassContext
from cggr_compile.passes.trace_routed_step import trace_routed_step_pass

# The order matters: fuse_scorer matches the unfused scoring that trace_routed_step leaves (it
# traces with the plan's fuse_scorer=False); check_fused_loss checks the final graph.
PASSES: tuple[Pass, ...] = (
    trace_routed_step_pass,  # build: Dynamo's graph -> the routed step for one plan
    fuse_scorer_pass,  # rewrite: the router's head + scoring -> cggr::fused_token_stats, where it pays
    check_fused_loss_pass,  # analysis: the fused loss op is in the graph exactly when chosen
)

DUMP_ENV = "CGGR_DUMP_PASSES"


def _dump(gm: fx.GraphModule, index: int, name: str) -> None:
    """The graph after pass ``index`` (``name``), where ``CGGR_DUMP_PASSES`` asks for it."""
    where = os.environ.get(DUMP_ENV, "")
    if where in ("", "0"):
        return
    text = gm.print_readable(print_output=False)
    if where.lower() in ("1", "true", "yes"):
        sys.stderr.write(f"# cggr: the graph after pass {index} ({name})\n{text}\n")
        return
    path = Path(where)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{index:02d}_{name}.txt").write_text(text)


def run_passes(gm: fx.GraphModule, context: PassContext, passes: Sequence[Pass] = PASSES) -> fx.GraphModule:
    """Run ``passes`` in order on Dynamo's graph ``gm``; returns the routed step they build."""
    for index, p in enumerate(passes):
        before = len(gm.meta.get(PASSES_META, []))
        out = p(gm, context)
        records = out.meta.get(PASSES_META, [])
        # Every pass says what it did (a new graph starts its own record); a silent one is a bug.
        if len(records) <= (before if out is gm else 0):
            raise AssertionError(f"pass {p.__name__} recorded nothing in gm.meta[{PASSES_META!r}]")
        gm = out
        _dump(gm, index, records[-1]["pass"])
    return gm
