"""Pass: build the rewritten training graph for one routed plan (one level ``k``).

Precondition: a :class:`~cggr_compile.passes.recognise_training_graph.GraphPlan` for Dynamo's
graph, the module it was captured from (its CGGR core) and the core's
:class:`~cggr_compile.schedule.RoutedPlan` for the step.
Guarantees: an FX graph with Dynamo's placeholder order (plus the schedule's step counter) that
runs the truncated router under no-grad, scores and selects with ``cggr_compile.scoring``, runs the
model on the selected rows only (or the whole batch with a token mask) and returns
``(loss, logits, selection, *metrics)``. It is traced from the very code that
``cggr_compile.transform`` runs (``CGGRModel.routed_step``), so the two entry points cannot drift
apart. Every parameter and buffer is a graph input (looked up by identity and swapped in through
``CGGRModel.swapped_tensors``), none is baked in; the plan's step counter is the graph input after
Dynamo's. The core itself is not changed.
With ``dynamo_gm`` given, the placeholders carry Dynamo's sources (``carry_dynamo_sources``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from cggr_compile.exit import EXIT_METRIC_KEYS
from cggr_compile.passes.pass_context import PassContext, record_pass
from cggr_compile.passes.recognise_training_graph import GraphPlan
from cggr_compile.schedule import RoutedPlan

METRIC_KEYS = ("avg_confidence", "avg_entropy", "avg_difficulty", "selected_difficulty", "tokens_selected",
               "tokens_total")
# scoring='predicted' runs no vocabulary head (no confidence or entropy) and reports its exit instead.
EXIT_STEP_METRIC_KEYS = ("avg_difficulty", "selected_difficulty", "tokens_selected", "tokens_total") + EXIT_METRIC_KEYS


# selection='truncation' also reports what it skipped (cggr_compile.metrics.skip_metrics).
SKIP_METRIC_KEYS = ("skipped_share", "skipped")


def metric_keys(core: Any) -> tuple[str, ...]:
    """The metrics the rewritten graph returns after ``(loss, logits, selection)``, in order; a graph
    of a core with a learned exit returns the exit's new state after them."""
    keys = EXIT_STEP_METRIC_KEYS if core.exit is not None else METRIC_KEYS
    return keys + SKIP_METRIC_KEYS if core.cggr_config.selection == "truncation" else keys


def step_inputs(core: Any, routed: RoutedPlan, references: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
    """The rewritten graph's inputs after Dynamo's: the step counter, the reference model's tensors
    (``references``, when the caller keeps them, else looked up) and the learned exit's state
    (``scoring='predicted'``)."""
    exit_state = [routed.exit_state] if core.exit is not None else []
    refs = reference_tensors(core) if references is None else references
    return [routed.step_tensor] + refs + exit_state


def reference_tensors(core: Any) -> list[torch.Tensor]:
    """The reference model's parameters and buffers (``scoring='reducible'`` with ``reference=``):
    inputs of the rewritten graph after the step counter, so no weight is baked into it."""
    ref = core.cggr_config.reference
    if not isinstance(ref, torch.nn.Module):
        return []
    unique: dict[int, torch.Tensor] = {}
    for t in list(ref.parameters()) + list(ref.buffers()):
        unique.setdefault(id(t), t)
    return list(unique.values())


def routed_step_fn(core: Any, plan: GraphPlan, routed: RoutedPlan, example_inputs: Sequence[Any],
                   call_kwargs: dict) -> Any:
    """The function of Dynamo's graph arguments, then :func:`step_inputs` (the step counter, the
    reference model's tensors, the exit's state), that the rewritten graph computes:
    ``core.routed_step`` under ``routed``. It returns ``(loss, logits, selection, *metrics)`` in
    :func:`metric_keys` order, then the exit's new state where there is an exit."""
    originals = [example_inputs[p] for p in plan.others]
    references = reference_tensors(core)
    n = len(example_inputs)
    keys = metric_keys(core)

    def step(*args: Any) -> tuple:
        graph_args, step_tensor = args[:n], args[n]
        reference_args = args[n + 1: n + 1 + len(references)]
        exit_state = args[n + 1 + len(references)] if core.exit is not None else None
        inputs = {name: graph_args[p] for name, p in plan.inputs.items()}
        swaps = {id(o): graph_args[p] for o, p in zip(originals, plan.others) if isinstance(o, torch.Tensor)}
        swaps.update({id(o): a for o, a in zip(references, reference_args)})
        # The call's own arguments (also a None attention_mask: _routed_step takes those three
        # positionally) never go in twice.
        own = ("input_ids", "attention_mask", "labels")
        kwargs = {k: v for k, v in call_kwargs.items() if not isinstance(v, torch.Tensor) and k not in own}
        kwargs.update({k: v for k, v in inputs.items() if k not in own})
        with core.swapped_tensors(swaps):
            out, metrics, new_exit_state = core.routed_step(
                routed.replace(step_tensor=step_tensor, exit_state=exit_state), inputs["input_ids"],
                inputs.get("attention_mask"), inputs["labels"], kwargs,
            )
        selection = out["selected_indices"] if "selected_indices" in out else out["selected_mask"]
        extras = [metrics[k] if k in metrics else torch.zeros(()) for k in keys]
        tail = (new_exit_state,) if new_exit_state is not None else ()
        return (out["loss"], out["logits"], selection, *extras, *tail)

    return step


def carry_dynamo_sources(dynamo_gm: fx.GraphModule, gm: fx.GraphModule) -> bool:
    """Give ``gm``'s placeholders the sources Dynamo gave ``dynamo_gm``'s (same order; extra trailing
    placeholders get none), the way DDPOptimizer propagates them to its split graphs.

    Why: AOTAutograd marks an input static (parameters: CUDA graphs re-record if they move, instead
    of copying every parameter into graph memory on each replay) only for graphs it recognises as
    Dynamo's. Returns False, changing nothing, where this torch version lacks the metadata.
    """
    try:
        from torch._dynamo.source import ConstantSource

        compile_id = dynamo_gm.meta["dynamo_compile_id"]
        old = list(dynamo_gm.graph.find_nodes(op="placeholder"))
        new = list(gm.graph.find_nodes(op="placeholder"))
        sources = [getattr(n, "_dynamo_source") for n in old]
    except (AttributeError, KeyError, ImportError):
        return False
    if len(new) < len(old):
        return False
    for i, node in enumerate(new):
        node._dynamo_source = sources[i] if i < len(old) else None  # type: ignore[attr-defined]
        if i < len(old) and "tensor_dict" in old[i].meta:
            node.meta["tensor_dict"] = old[i].meta["tensor_dict"]
    # The traced graph's own attributes (constants make_fx lifted) need a source each too.
    own = [name for name, _ in gm.named_parameters(remove_duplicate=False)] + \
          [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    gm._param_name_to_source = {name: ConstantSource(f"cggr_routed_{name}") for name in own}  # type: ignore[assignment]
    gm.meta["dynamo_compile_id"] = compile_id
    return True


def trace_routed_step(
    core: Any, plan: GraphPlan, routed: RoutedPlan, example_inputs: Sequence[Any], call_kwargs: dict,
    dynamo_gm: Optional[fx.GraphModule] = None,
) -> fx.GraphModule:
    """Trace the rewritten step for ``routed`` (its ``k``, ratio, fusion choice) into an FX graph
    (fake tensors); ``routed.step_tensor`` is the example value of the step counter's input."""
    fn = routed_step_fn(core, plan, routed, example_inputs, call_kwargs)
    args = list(example_inputs) + step_inputs(core, routed)
    gm = make_fx(fn, tracing_mode="fake", pre_dispatch=True)(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if dynamo_gm is not None:
        carry_dynamo_sources(dynamo_gm, gm)
    return gm


def trace_routed_step_pass(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    """Pipeline entry: Dynamo's graph ``gm`` in, the routed step for ``context.routed`` out.

    Traced with the router's scoring unfused (the plan with ``fuse_scorer=False``: head, then
    ``scoring.token_stats``), so that whether the scorer fuses is ``passes/fuse_scorer``'s decision,
    visible in the graph, not the router code's."""
    routed = trace_routed_step(context.core, context.graph_plan, context.routed.replace(fuse_scorer=False),
                               context.example_inputs, context.call_kwargs,
                               gm if context.carry_dynamo_sources else None)
    record_pass(routed, "trace_routed_step", f"traced the routed step for {context.routed} "
                f"({len(routed.graph.nodes)} nodes from Dynamo's {len(gm.graph.nodes)})", changed=True)
    return routed
