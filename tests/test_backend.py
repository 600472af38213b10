"""The ``cggr`` Dynamo backend: discovery, when it rewrites and when it must not, schedules,
graph snapshots and the rows that reach the backward graph."""

from __future__ import annotations

import importlib.metadata
import warnings

import expecttest
import pytest
import torch

import cggr_compile
from cggr_compile.backend import core_of
from models import batch, tiny_model

OPTS = dict(router_layers=1, warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.5, strict=True,
            selection="topk")


def test_backend_is_registered_and_discoverable():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "cggr" in list_backends(exclude_tags=())
    assert lookup_backend("cggr") is cggr_compile.backend.cggr_backend
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "cggr" and ep.value == "cggr_compile.backend:cggr_backend" for ep in eps)


def test_passes_do_not_install_as_a_bare_top_level_module(tmp_path):
    import subprocess
    import sys

    code = ("import importlib.util, cggr_compile.passes as p; "
            "print(p.__name__, importlib.util.find_spec('passes') is None)")
    # run outside the checkout: only what is installed is importable there
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert out.stdout.split() == ["cggr_compile.passes", "True"], out.stderr


@pytest.mark.parametrize("mode", ["eval", "no_grad", "no_labels"])
def test_backend_leaves_non_training_calls_unchanged(mode):
    model = tiny_model("llama")
    b = batch("llama")
    if mode == "no_labels":
        b.pop("labels")
    if mode == "eval":
        model.eval()
    ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("error")  # expected behaviour: no warning
        got = torch.compile(model, backend="cggr", options=OPTS)(**b)
        ref = model(**b)
    torch.testing.assert_close(got.logits, ref.logits)
    assert got.logits.shape[0] == 6


def test_unrewritable_graph_warns_once_and_still_trains():
    model = tiny_model("llama")
    b = batch("llama")

    def step(input_ids, labels):
        logits = model(input_ids=input_ids).logits
        return (logits.float() ** 2).mean() + 0 * labels.sum()  # a custom loss: nothing to route

    compiled = torch.compile(step, backend="cggr")
    with pytest.warns(UserWarning, match="cggr backend: not rewriting this graph: .*compiled unmodified"):
        loss = compiled(b["input_ids"], b["labels"])
    loss.backward()
    assert model.lm_head.weight.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(b["input_ids"], b["labels"])  # once only


def test_gpt2_loss_type_break_does_not_stop_the_rewrite():
    model = tiny_model("gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="cggr", options=OPTS)(**batch("gpt2"))
    assert not [w for w in caught if "cggr backend" in str(w.message)]
    assert out.logits.shape[0] == 3


def test_backend_schedule_advances_and_compiles_per_level_only():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="cggr", options=dict(
        router_layers=1, warmup_steps=12, min_tokens_ratio=0.25, num_levels=4, dynamic_threshold=False))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    b = batch("llama", b=8)
    ks = []
    for _ in range(16):
        out = compiled(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        cggr_compile.step(compiled)
        ks.append(cggr_compile.last_metrics(model)["k"])
    core = core_of(model)
    assert ks == sorted(ks, reverse=True) and ks[0] == 8 and ks[-1] == 2
    assert len(core.routed_graphs) == 1  # Dynamo captured once
    assert {level.k for level in core.routed_graphs[0].compiled} == set(ks) and len(set(ks)) <= 4


def test_backward_graph_holds_only_selected_rows():
    from pass_helpers import backward_leading_dims

    model = tiny_model("llama")
    b = batch("llama", b=10)  # B=10 and k=3 differ from every other dim of the tiny model
    torch.compile(model, backend="cggr", options=dict(OPTS, min_tokens_ratio=0.25))(**b)
    routed = core_of(model).routed_graphs[0]
    (level, gm), = routed.graphs.items()
    k = level.k
    args = [b["input_ids"] if i == routed.plan.inputs["input_ids"] else
            b["attention_mask"] if i == routed.plan.inputs.get("attention_mask") else
            b["labels"] if i == routed.plan.inputs["labels"] else x
            for i, x in enumerate(routed.example_inputs)] + [torch.zeros((), dtype=torch.int64)]
    core = core_of(model)
    if core.exit is not None:  # the learned exit's state is the graph input after the step counter
        args.append(core.exit.state_on(torch.device("cpu")))
    dims = backward_leading_dims(gm, args)
    assert k == 3 and 3 in dims and 10 not in dims


class TestGraphSnapshot(expecttest.TestCase):
    def _text(self, granularity, scoring="entropy"):
        torch.manual_seed(0)
        import transformers as T

        cfg = T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=32)
        model = T.LlamaForCausalLM(cfg)
        ids = torch.randint(0, 32, (4, 6))
        return cggr_compile.explain(model, ids, torch.ones_like(ids), router_layers=1, min_tokens_ratio=0.5, selection="topk",
                                    warmup_steps=0, scoring=scoring, granularity=granularity)

    def test_sequences(self):
        self.assertExpectedInline(self._text("sequences"), """\
embedding() -> float32[4, 6, 16]
scaled_dot_product_attention() -> float32[4, 2, 6, 8]
log_softmax.int(-1) -> float32[4, 6, 32]
topk(2)
sort.stable()
sort()
index_select(0) -> bool[2, 6]
index_select(0) -> int64[2, 6]
index_select(0) -> int64[2, 6]
embedding() -> float32[2, 6, 16]
scaled_dot_product_attention() -> float32[2, 2, 6, 8]
scaled_dot_product_attention() -> float32[2, 2, 6, 8]
index_select(0) -> int64[2, 6]
cross_entropy_loss(None, 2) -> float32[]
index_select(0) -> float32[2, 6]
return float32[], float32[2, 6, 32], int64[2], float32[], float32[], float32[], float32[], int64[], int64[]""")

    def test_sequences_predicted(self):
        """scoring='predicted': no head in the router, the main pass's per-token loss, the exit's fit
        (one opaque op) and its next state returned last."""
        self.assertExpectedInline(self._text("sequences", scoring="predicted"), """\
embedding() -> float32[4, 6, 16]
scaled_dot_product_attention() -> float32[4, 2, 6, 8]
sort.stable()
sort()
index_select(0) -> bool[2, 6]
index_select(0) -> int64[2, 6]
index_select(0) -> int64[2, 6]
embedding() -> float32[2, 6, 16]
scaled_dot_product_attention() -> float32[2, 2, 6, 8]
scaled_dot_product_attention() -> float32[2, 2, 6, 8]
index_select(0) -> int64[2, 6]
cross_entropy_loss(None, 0) -> float32[12]
index_select(0) -> float32[2, 6, 16]
index_select(0) -> float32[2, 6]
cggr.exit_fit(16, 0.97, 0.001, 4)
index_select(0) -> float32[2, 6]
return float32[], float32[2, 6, 32], int64[2], float32[], float32[], int64[], int64[], float32[], float32[], float32[], float32[], float32[331]""")

    def test_tokens(self):
        self.assertExpectedInline(self._text("tokens"), """\
embedding() -> float32[4, 6, 16]
scaled_dot_product_attention() -> float32[4, 2, 6, 8]
log_softmax.int(-1) -> float32[4, 6, 32]
topk(2)
sort.stable()
embedding() -> float32[4, 6, 16]
scaled_dot_product_attention() -> float32[4, 2, 6, 8]
scaled_dot_product_attention() -> float32[4, 2, 6, 8]
cross_entropy_loss(None, 2) -> float32[]
return float32[], float32[4, 6, 32], bool[4, 6], float32[], float32[], float32[], float32[], int64[], int64[]""")


def test_positional_input_ids_are_understood():
    model = tiny_model("llama")
    b = batch("llama")
    out = torch.compile(model, backend="cggr", options=OPTS)(b["input_ids"], b["attention_mask"], labels=b["labels"])
    assert out.logits.shape[0] == 3 and core_of(model).metrics()["k"] == 3


def test_compiling_again_with_new_options_uses_them():
    model = tiny_model("llama")
    b = batch("llama")
    torch.compile(model, backend="cggr", options=OPTS)(**b)
    torch._dynamo.reset()
    out = torch.compile(model, backend="cggr", options=dict(OPTS, min_tokens_ratio=1 / 6))(**b)
    assert out.logits.shape[0] == 1


def test_reduce_overhead_mode_is_accepted_and_bad_modes_are_named():
    model = tiny_model("llama", layers=6)  # mode= excludes options=: the default router (4 layers) must fit
    b = batch("llama", b=8)
    out = torch.compile(model, backend="cggr", mode="reduce-overhead")(**b)  # CUDA graphs: no-op on CPU
    assert out.loss.isfinite() and core_of(model).metrics()["k"] == 8  # rewritten (warmup: ratio 1 at step 0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="mode='max-autotune' is not supported"):
        torch.compile(tiny_model("llama"), backend="cggr", mode="max-autotune")(**b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cudagraphs_option_gives_the_same_step_without_skips():
    from torch._dynamo.utils import counters

    b = {k: v.cuda() for k, v in batch("llama", b=8).items()}
    results = []
    for cudagraphs in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model("llama").cuda()
        cm = torch.compile(model, backend="cggr", options=dict(OPTS, cudagraphs=cudagraphs))
        for _ in range(3):  # record, then replay
            model.zero_grad(set_to_none=True)
            loss = cm(**b).loss
            loss.backward()
        results.append((loss.detach().clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        if cudagraphs:
            assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    assert len(g0) == len(g1)
    for a, c in zip(g0, g1):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_token_granularity_compiles_one_graph_per_token_ratio():
    """Two levels with the same k (B=8: ratios 0.893 and 1.0 both give k=8) but different token
    budgets must not share a graph: the backend selects as many tokens as the transform each step."""
    opts = dict(OPTS, granularity="tokens", warmup_steps=7, min_tokens_ratio=0.25, num_levels=8)
    b = batch("llama", b=8)
    backend_model, transform_model = tiny_model("llama"), tiny_model("llama")
    compiled = torch.compile(backend_model, backend="cggr", options=opts)
    cg = cggr_compile.transform(transform_model, **opts)
    got, want = [], []
    for _ in range(8):
        compiled(**b).loss.backward()
        m = cggr_compile.last_metrics(backend_model)
        got.append((m["token_ratio"], int(m["tokens_selected"])))
        out = cg(**b)
        out.loss.backward()
        want.append((out.cggr_metrics["token_ratio"], int(out.cggr_metrics["tokens_selected"])))
        cggr_compile.step(compiled)
        cg.step()
    assert got == want
    assert len({n for _, n in got}) == 8  # every level selected its own number of tokens


def _wrapped_forward(forward):
    """The shape of transformers 5.24's ``deprecate_kwarg``: a frame with only ``args`` and ``kwargs``."""
    import functools

    @functools.wraps(forward)
    def wrapped_func(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapped_func


def test_a_second_model_of_the_class_is_not_routed_with_the_first_ones_schedule():
    """Dynamo serves a second instance of a class with the graph it compiled for the first (their
    parameters are its inputs); that graph's CGGR core (schedule, metrics) is the first model's."""
    b = batch("llama")
    first = tiny_model("llama", seed=0)
    torch.compile(first, backend="cggr", options=OPTS)(**b).loss.backward()
    second = tiny_model("llama", seed=1)
    with pytest.raises(Exception, match="reused the training graph it compiled for another LlamaForCausalLM.*"
                                        "torch._dynamo.reset\(\)"):
        torch.compile(second, backend="cggr", options=OPTS)(**b)
    torch._dynamo.reset()  # as the message says: then the second model gets its own graph and core
    torch.compile(second, backend="cggr", options=OPTS)(**b).loss.backward()
    assert core_of(second) is not None and core_of(second) is not core_of(first)


@pytest.mark.parametrize("call", ["keywords", "positional"])
def test_module_is_found_inside_a_decorator_without_self(call):
    """The backend finds the model by the parameters its graph lifted, not by a local named ``self``."""
    import transformers as T

    class WrappedLlama(T.LlamaForCausalLM):
        forward = _wrapped_forward(T.LlamaForCausalLM.forward)

    torch.manual_seed(0)
    model = WrappedLlama(tiny_model("llama").config).train()
    b = batch("llama")
    compiled = torch.compile(model, backend="cggr", options=OPTS)
    out = compiled(**b) if call == "keywords" else compiled(b["input_ids"], b["attention_mask"], labels=b["labels"])
    assert out.logits.shape[0] == 3 and core_of(model).metrics()["k"] == 3


def test_strict_makes_a_fallback_an_error_that_names_the_reason():
    model = tiny_model("llama")
    b = batch("llama")

    def step(input_ids, labels):
        return (model(input_ids=input_ids).logits.float() ** 2).mean() + 0 * labels.sum()

    with pytest.raises(Exception, match="CGGRFallbackError.*not rewriting this graph.*strict=True"):
        torch.compile(step, backend="cggr", options=dict(strict=True))(b["input_ids"], b["labels"])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_explain_without_a_mask_and_with_labels_positionally(name):
    """explain(gpt2, ids, None, ids) died in the trace ('multiple values for attention_mask');
    the same call on a compiled model trains."""
    model = tiny_model(name)
    ids = batch(name)["input_ids"]
    opts = dict(OPTS, router_layers=2)
    for args in ((ids,), (ids, None, ids), (ids, torch.ones_like(ids), ids)):
        text = cggr_compile.explain(model, *args, **opts)
        assert "index_select(0) -> int64[3, 12]" in text and "float32[3, 12, 64]" in text, text  # 3 of 6 rows train
    out = torch.compile(model, backend="cggr", options=opts)(input_ids=ids, attention_mask=None, labels=ids)
    out.loss.backward()
    assert cggr_compile.last_metrics(model)["selected_indices"].shape == (3,)
