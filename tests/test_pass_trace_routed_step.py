"""passes/trace_routed_step: the rewritten graph's structure for one level k."""

from __future__ import annotations

import torch

import cggr_compile
from cggr_compile.config import CGGRConfig
from cggr_compile.passes.recognise_training_graph import recognise
from cggr_compile.passes.trace_routed_step import trace_routed_step
from models import batch, tiny_model
from pass_helpers import capture


def _rewritten(granularity="sequences", ratio=0.5):
    model = tiny_model("llama")
    b = batch("llama", b=10)
    got = capture(model, **b)
    plan = recognise(got["gm"], got["example_inputs"], got["kwargs"])
    core = cggr_compile.transform(model, CGGRConfig(router_layers=1, min_tokens_ratio=ratio, warmup_steps=0,
                                                     dynamic_threshold=False, granularity=granularity,
                                                     scoring="combined", selection="topk"))
    routed = core.plan_step(plan.batch, torch.device("cpu"))
    gm = trace_routed_step(core, plan, routed, got["example_inputs"], got["kwargs"])
    return model, got, gm


def _calls(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


def test_inputs_are_sliced_to_k_rows_and_every_weight_is_an_input():
    model, got, gm = _rewritten(ratio=0.3)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(got["example_inputs"]) + 1  # + the schedule's step counter
    sliced = [tuple(n.meta["val"].shape) for n in _calls(gm, "index_select")]
    assert (3, 12) in sliced and all(s[0] == 3 for s in sliced)
    # no parameter is baked into the graph as a constant
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    params = {id(p) for p in model.parameters()}
    assert not [a for a in attrs if id(getattr(gm, a.target, None)) in params]


def test_router_runs_under_no_grad_and_the_main_pass_on_k_rows():
    _, _, gm = _rewritten(ratio=0.3)
    nodes = list(gm.graph.nodes)
    sdpa = _calls(gm, "scaled_dot_product_attention")
    assert [n.meta["val"].shape[0] for n in sdpa] == [10, 3, 3, 3]  # router: 1 layer; main: 3 layers
    grad_modes = [n.args[0] for n in _calls(gm, "_set_grad_enabled")]
    assert grad_modes[0] is False and True in grad_modes
    first_off = nodes.index(_calls(gm, "_set_grad_enabled")[0])
    assert first_off < nodes.index(sdpa[0])
    assert len(_calls(gm, "cross_entropy")) == 1


def test_tokens_granularity_keeps_the_batch_and_masks_the_loss():
    _, _, gm = _rewritten(granularity="tokens")
    assert not _calls(gm, "index_select")
    sdpa = _calls(gm, "scaled_dot_product_attention")
    assert [n.meta["val"].shape[0] for n in sdpa] == [10, 10, 10, 10]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out[2].meta["val"].dtype == torch.bool and tuple(out[2].meta["val"].shape) == (10, 12)


def test_dynamo_sources_are_carried_so_parameters_are_static_inputs():
    """AOTAutograd must see the parameters as static inputs (CUDA graphs then do not copy them)."""
    from torch._functorch._aot_autograd import frontend_utils

    model = tiny_model("llama")
    b = batch("llama", b=10)
    got = capture(model, **b)
    plan = recognise(got["gm"], got["example_inputs"], got["kwargs"])
    core = cggr_compile.transform(model, CGGRConfig(router_layers=1, min_tokens_ratio=0.5, warmup_steps=0,
                                                     dynamic_threshold=False, scoring="combined", selection="topk"))
    routed = core.plan_step(plan.batch, torch.device("cpu"))
    gm = trace_routed_step(core, plan, routed, got["example_inputs"], got["kwargs"], got["gm"])
    own = list(dict(gm.named_buffers()).keys()) + list(dict(gm.named_parameters()).keys())
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    _, static = frontend_utils._try_get_metadata_from_dynamo(gm, own, len(own) + len(placeholders), [])
    dynamic = [placeholders[i - len(own)].meta["val"] for i in range(len(own), len(own) + len(placeholders))
               if i not in static]
    params = {id(p) for p in model.parameters()}
    static_args = [got["example_inputs"][i - len(own)] for i in static if len(own) <= i < len(own) + len(got["example_inputs"])]
    assert len(dynamic) == 4  # input_ids, attention_mask, labels and the step counter
    assert {id(t) for t in static_args} >= params
