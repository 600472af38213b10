"""passes/fuse_scorer: the router's head + scoring subgraph becomes one fused_token_stats call."""

from __future__ import annotations

import operator

import pytest
import torch
import transformers as T
from torch._dynamo.utils import counters

import cggr_compile
from cggr_compile.backend import core_of
from cggr_compile.config import CGGRConfig
from cggr_compile.ops import fused_scorer as fs
from cggr_compile.passes import fuse_scorer as pass_mod
from cggr_compile.passes.fuse_scorer import fuse_scorer, fusion_pays
from cggr_compile.passes.recognise_training_graph import recognise
from cggr_compile.passes.trace_routed_step import trace_routed_step
from models import VOCAB, batch, tiny_model
from pass_helpers import capture

UNFUSED = ("log_softmax", "aten.exp.", "topk", "gather")
OPTS = dict(strict=True, router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False,
            scoring="loss", selection="topk")


def _unfused(name="llama", scoring="combined", router=None, b=10):
    """Dynamo's graph of a training call and the rewritten step traced with the scoring unfused."""
    model = tiny_model(name)
    data = batch(name, b=b)
    got = capture(model, **data)
    plan = recognise(got["gm"], got["example_inputs"], got["kwargs"])
    core = cggr_compile.transform(model, CGGRConfig(**dict(OPTS, scoring=scoring, router=router)))
    routed = core.plan_step(plan.batch, torch.device("cpu")).replace(fuse_scorer=False)
    gm = trace_routed_step(core, plan, routed, got["example_inputs"], got["kwargs"])
    return gm, list(got["example_inputs"]) + [routed.step_tensor]


def _calls(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


def _real_values(gm, args):
    """Every node's value when the graph runs on real tensors."""
    seen = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n] = super().run_node(n)
            return seen[n]

    out = Record(gm).run(*args)
    return out, seen


@pytest.mark.parametrize("name", ["llama", "gemma2", "bert", "gpt2"])
def test_op_replaces_the_unfused_scoring_with_the_same_numbers(name):
    gm, args = _unfused(name)
    assert _calls(gm, "log_softmax") and _calls(gm, "topk") and not _calls(gm, "fused_token_stats")
    ref = gm(*args)
    before = {n.name for n in gm.graph.nodes}

    result = fuse_scorer(gm, force=True)
    assert result.fused == 1 and result.reason.startswith("fused:"), result.reason
    assert gm.meta["cggr_fuse_scorer"] == result.reason
    (op,) = _calls(gm, "cggr.fused_token_stats")
    for unfused in UNFUSED:
        assert not [n for n in _calls(gm, unfused) if n.args[0].meta["val"].shape[-1] == VOCAB], unfused
    # the router's head went with the scoring: the head weight's only other reader is the main
    # pass's head, on the k = 5 selected rows (the router's ran on all 10)
    weight = op.args[1]
    heads = [u for u in weight.users if "linear" in str(u.target)]
    assert weight.op == "placeholder" and [u.meta["val"].shape[0] for u in heads] == [5]
    assert (op.args[4] if len(op.args) > 4 else None) == (2.0 if name == "gemma2" else None)  # Gemma2's softcap

    # every node the pass added carries a fake value that matches the real one; none mutates
    out, real = _real_values(gm, args)
    added = [n for n in gm.graph.nodes if n.name not in before]
    assert {str(n.target) for n in added} <= {"aten.reshape.default", "aten.full.default", str(operator.getitem),
                                             "cggr.fused_token_stats.default"}
    for n in added:
        fake, got = n.meta["val"], real[n]
        for f, r in zip(fake if isinstance(fake, tuple) else (fake,), got if isinstance(got, tuple) else (got,)):
            assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device), n.name

    # the same step: loss, main-pass logits, selection and metrics (float rounding only)
    assert torch.equal(out[2], ref[2])  # the selection
    for i, (a, b) in enumerate(zip(out, ref)):
        # out[5] is avg_difficulty: with combined scoring a mean of z-scores, 0 up to the rounding of
        # float32 sums of O(1) terms (seen: 2.7e-6 against 1.3e-6 on torch 2.13), so an absolute 1e-5
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if i == 5 else 1e-6)


@pytest.mark.parametrize("scoring", ["entropy", "margin", "loss"])
def test_each_scoring_reads_only_the_statistics_it_needs(scoring):
    gm, args = _unfused(scoring=scoring)
    ref = gm(*args)
    assert fuse_scorer(gm, force=True).fused == 1
    (op,) = _calls(gm, "cggr.fused_token_stats")
    used = {u.args[1] for u in op.users}
    assert {1, 2} <= used  # avg_entropy and avg_confidence are always reported
    # without the label NLL among the scores, the op gets no labels (all -100), not a gather
    assert (op.args[3].target == torch.ops.aten.full.default) == (scoring != "loss")
    for a, b in zip(gm(*args), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _unchanged(gm, result, match):
    assert result.fused == 0 and not result
    assert match in result.reason, result.reason
    assert not _calls(gm, "fused_token_stats") and _calls(gm, "log_softmax")


def test_declines_when_off():
    gm, _ = _unfused()
    code = gm.code
    _unchanged(gm, fuse_scorer(gm, enabled=False, force=True), "fused_scorer=False")
    assert gm.code == code


def test_declines_where_it_does_not_pay_and_says_why():
    gm, _ = _unfused()
    code = gm.code
    # CPU, 120 tokens x 64: the chunked torch path would be one chunk, nothing saved
    _unchanged(gm, fuse_scorer(gm), "one chunk")
    assert gm.code == code


def test_policy():
    h = torch.empty(8, 16, device="meta")
    assert "one chunk" in fusion_pays(h, 64, 8)
    assert fusion_pays(h, 1 << 16, 1 << 8) is None  # the logits exceed a chunk: the chunked path pays


def test_policy_for_the_triton_kernel(monkeypatch):
    monkeypatch.setattr(fs, "_use_triton", lambda t: True)
    h = torch.empty(8, 16, device="meta")
    assert "MIN_VOCAB" in fusion_pays(h, pass_mod.MIN_VOCAB - 1, 1 << 20)
    assert fusion_pays(h, pass_mod.MIN_VOCAB, 8) is None


def test_declines_when_the_logits_have_another_reader():
    gm, _ = _unfused()
    (ls,) = _calls(gm, "log_softmax")
    with gm.graph.inserting_after(ls):
        gm.graph.call_function(torch.ops.aten.amax.default, (ls.args[0], [-1]))  # a second reader
    _unchanged(gm, fuse_scorer(gm, force=True), "fusing would still materialise it")


def test_declines_a_router_that_returns_difficulties():
    gm, _ = _unfused(router=lambda ids, mask, **_: ids.float())
    result = fuse_scorer(gm, force=True)
    assert result.fused == 0 and "no softmax scoring" in result.reason


def test_declines_logits_that_are_not_one_linear_layer():
    holder = {}

    def router(ids, mask, **_):  # logits scaled after the head: not head(hidden)
        return holder["model"](input_ids=ids, attention_mask=mask).logits * 3.0

    model = tiny_model("llama")
    holder["model"] = model
    data = batch("llama", b=10)
    got = capture(model, **data)
    plan = recognise(got["gm"], got["example_inputs"], got["kwargs"])
    core = cggr_compile.transform(model, CGGRConfig(router=router, **OPTS))
    routed = core.plan_step(plan.batch, torch.device("cpu"))
    gm = trace_routed_step(core, plan, routed, got["example_inputs"], got["kwargs"])
    _unchanged(gm, fuse_scorer(gm, force=True), "not from the head")


def _big_vocab_llama(vocab, device="cpu"):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab, initializer_range=0.2)
    return T.LlamaForCausalLM(cfg).to(device).train()


def _ids(vocab, b, t, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=g).to(device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


def test_backend_graph_gets_the_op_from_the_pass_where_it_pays():
    """CPU, 8 x 64 tokens x vocabulary 16384 (8.4M logits, two chunks): the pass fuses."""
    vocab = 16384
    model = _big_vocab_llama(vocab)
    data = _ids(vocab, 8, 64)
    out = torch.compile(model, backend="cggr", options=OPTS)(**data)
    routed = core_of(model).routed_graphs[0]
    (gm,) = routed.graphs.values()
    assert gm.meta["cggr_fuse_scorer"].startswith("fused: 512 tokens x vocabulary 16384"), gm.meta["cggr_fuse_scorer"]
    assert len(_calls(gm, "cggr.fused_token_stats")) == 1 and not _calls(gm, "log_softmax")
    # the eager transform (which calls the op from its router code) computes the same step
    eager = cggr_compile.transform(model, **OPTS)(**data)
    assert torch.equal(cggr_compile.last_metrics(model)["selected_indices"], eager.selected_indices)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (torch.cuda.is_available() and fs.HAS_TRITON_OP), reason="needs CUDA and Triton")
def test_gpu_backend_compiles_the_fused_kernel_into_inductors_code():
    from torch._inductor.utils import run_and_get_code
    from torch.testing import FileCheck

    vocab = 4096  # >= MIN_VOCAB
    model = _big_vocab_llama(vocab, "cuda")
    data = _ids(vocab, 8, 128, "cuda")
    compiled = torch.compile(model, backend="cggr", options=OPTS)
    out, codes = run_and_get_code(lambda: compiled(**data))
    (gm,) = core_of(model).routed_graphs[0].graphs.values()
    assert gm.meta["cggr_fuse_scorer"].startswith("fused:"), gm.meta["cggr_fuse_scorer"]
    assert len(_calls(gm, "cggr.fused_token_stats")) == 1 and not _calls(gm, "log_softmax")
    code = "\n".join(codes)
    FileCheck().check("_scorer_partial_kernel").check("_scorer_combine_kernel").run(code)
    eager = cggr_compile.transform(model, **OPTS)(**data)
    assert torch.equal(cggr_compile.last_metrics(model)["selected_indices"], eager.selected_indices)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-4, atol=1e-4)


def test_under_autocast_the_op_gets_the_autocast_dtype_like_the_unfused_head():
    """A pre-dispatch graph traced under autocast shows the head in float32; the op must still get
    bfloat16 inputs, or its matmul runs in float32 (seen on an H200: 122 ms instead of 3 ms)."""
    gm, args = _unfused("llama")
    with torch.autocast("cpu", torch.bfloat16):
        ref = gm(*args)
    result = fuse_scorer(gm, force=True, autocast_dtype=torch.bfloat16)
    assert result.fused == 1, result.reason
    (op,) = _calls(gm, "cggr.fused_token_stats")
    assert op.args[0].meta["val"].dtype == op.args[1].meta["val"].dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):
        out = gm(*args)
    assert torch.equal(out[2], ref[2])  # the same rows
    torch.testing.assert_close(out[0], ref[0], rtol=2e-2, atol=2e-2)


def _traced_token_stats(with_labels=True, bias=True):
    """``scoring.token_stats`` itself on a linear head, traced like the routed step (pre-dispatch
    ATen, fake tensors, under no-grad where the router's final hidden state is computed)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from cggr_compile import scoring as S

    def scoring(h, w, b, target):
        with torch.no_grad():
            hidden = h * 1.0  # the router's final hidden state, computed under no-grad
            return tuple(S.token_stats(torch.nn.functional.linear(hidden, w, b), target if with_labels else None))

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(3, 5, 8, generator=g), torch.randn(VOCAB, 8, generator=g),
            torch.randn(VOCAB, generator=g) if bias else None, torch.randint(0, VOCAB, (3, 5), generator=g)]
    args[3][0, :2] = -100
    gm = make_fx(scoring, tracing_mode="fake", pre_dispatch=True)(*args)
    gm.graph.eliminate_dead_code()  # as trace_routed_step leaves it (topk's unused indices go)
    gm.recompile()
    return gm, args


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_the_matcher_takes_all_of_scoring_token_stats(with_labels, bias):
    """The pattern is hand-written against scoring.token_stats: trace that very function and require
    the matcher to take all of it (so a change to token_stats that the pass no longer matches fails
    here, not silently as an unfused router in every compiled step), with the same numbers."""
    gm, args = _traced_token_stats(with_labels, bias)
    (ls,) = _calls(gm, "log_softmax")
    m = pass_mod._match(ls)
    assert set(m.outputs) == ({"entropy", "p1", "p2", "nll"} if with_labels else {"entropy", "p1", "p2"})
    assert m.softcap is None and (m.target is not None) == with_labels and (m.bias is not None) == bias
    ref = gm(*args)
    counters.clear()
    assert fuse_scorer(gm, force=True).fused == 1
    assert dict(counters["cggr"]) == {"fuse_scorer_candidates": 1, "fuse_scorer_matched": 1, "fuse_scorer_fused": 1}
    for unfused in UNFUSED:
        assert not _calls(gm, unfused), unfused
    for a, b in zip(gm(*args), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_counters_count_candidates_matches_and_fusions_as_inductors_pattern_matcher():
    gm, _ = _unfused()
    counters.clear()
    fuse_scorer(gm)  # CPU, one chunk: matched, not fused
    assert dict(counters["cggr"]) == {"fuse_scorer_candidates": 1, "fuse_scorer_matched": 1}
    counters.clear()
    fuse_scorer(gm, force=True)
    assert counters["cggr"]["fuse_scorer_matched"] == 1 and counters["cggr"]["fuse_scorer_fused"] == 1
    counters.clear()
    fuse_scorer(gm, force=True)  # nothing left to match
    assert counters["cggr"]["fuse_scorer_candidates"] == 0 and counters["cggr"]["fuse_scorer_fused"] == 0


def test_the_pass_takes_the_ignore_index_from_scoring():
    from cggr_compile import scoring as S

    assert pass_mod.IGNORE_INDEX is S.IGNORE_INDEX
