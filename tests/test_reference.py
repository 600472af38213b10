"""scoring='reducible' (the router's loss minus a reference loss) on every entry point, and the
offline helper cggr_compile.reference_losses."""

from __future__ import annotations

import copy

import pytest
import torch

import cggr_compile
from cggr_compile.backend import core_of
from models import batch, tiny_model

OPTS = dict(strict=True, router_layers=1, warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.5,
            selection="topk")


def _router_loss(model, b):
    """Each row's mean router loss over its valid positions (scoring='loss')."""
    return cggr_compile.transform(model, scoring="loss", **OPTS).sequence_difficulty(**b)


def _hardest(values, k):
    order = sorted(range(values.numel()), key=lambda i: (-values[i].item(), i))
    return torch.tensor(sorted(order[:k]))


def test_per_sequence_reference_loss_is_subtracted_and_selects_by_it():
    model = tiny_model("llama")
    b = batch("llama")
    router_loss = _router_loss(model, b)
    # a reference that makes the easiest rows for the router the most learnable
    reference = router_loss - torch.arange(6, dtype=torch.float32) * 10
    cg = cggr_compile.transform(model, scoring="reducible", **OPTS)
    got = cg.sequence_difficulty(**b, reference_loss=reference)
    torch.testing.assert_close(got, router_loss - reference)
    out = cg(**b, reference_loss=reference)
    assert torch.equal(out["selected_indices"], _hardest(router_loss - reference, 3))
    assert not torch.equal(out["selected_indices"], _hardest(router_loss, 3))
    out.loss.backward()


def test_per_token_reference_loss_and_reference_model_agree():
    """A reference model run in the step gives the numbers reference_losses(per_token=True) gives offline."""
    model, ref_model = tiny_model("llama"), tiny_model("llama", seed=5)
    b = batch("llama")
    offline = cggr_compile.reference_losses(ref_model, [b], per_token=True, progress=False)
    assert offline.shape == b["input_ids"].shape
    carried = cggr_compile.transform(model, scoring="reducible", **OPTS)
    in_step = cggr_compile.transform(model, scoring="reducible", reference=ref_model, **OPTS)
    a = carried.sequence_difficulty(**b, reference_loss=offline)
    torch.testing.assert_close(in_step.sequence_difficulty(**b), a, rtol=1e-5, atol=1e-5)
    per_seq = cggr_compile.reference_losses(ref_model, [b], progress=False)
    torch.testing.assert_close(carried.sequence_difficulty(**b, reference_loss=per_seq), a, rtol=1e-5, atol=1e-5)


def test_truncated_reference_runs_its_first_layers_only():
    model, ref_model = tiny_model("llama"), tiny_model("llama", seed=5)
    b = batch("llama")
    want = cggr_compile.transform(ref_model, router_layers=2, scoring="loss", strict=True, warmup_steps=0,
                                  dynamic_threshold=False).sequence_difficulty(**b)
    cg = cggr_compile.transform(model, scoring="reducible", reference=ref_model, reference_layers=2, **OPTS)
    torch.testing.assert_close(cg.sequence_difficulty(**b), _router_loss(model, b) - want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["sequences", "tokens"])
def test_backend_with_a_reference_model_matches_the_transform(granularity):
    ref_model = tiny_model("llama", seed=5)
    b = batch("llama")
    opts = dict(OPTS, scoring="reducible", reference=ref_model, granularity=granularity)
    model_t, model_b = tiny_model("llama"), tiny_model("llama")
    out_t = cggr_compile.transform(model_t, **opts)(**b)
    out_t.loss.backward()
    out_b = torch.compile(model_b, backend="cggr", options=opts)(**b)
    out_b.loss.backward()
    key = "selected_indices" if granularity == "sequences" else "selected_mask"
    assert torch.equal(cggr_compile.last_metrics(model_b)[key], out_t[key])
    torch.testing.assert_close(out_b.loss, out_t.loss, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(model_t.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(p.grad is None for p in ref_model.parameters())  # the reference only scores
    # the reference's weights are graph inputs (after the step counter), not constants baked in
    routed = core_of(model_b).routed_graphs[0]
    assert len(routed.references) == len(list(ref_model.parameters())) + len(list(ref_model.buffers()))


def _backend_against_transform(opts: dict, positional: bool = False, device: str = "cpu", steps: int = 3):
    """Train a model with the backend and its twin with the transform on the same batches and
    reference losses, checking loss, selection and gradients at every step; returns the backend's."""
    model_t, model_b = tiny_model("llama").to(device), tiny_model("llama").to(device)
    transformed = cggr_compile.transform(model_t, **{k: v for k, v in opts.items() if k != "cudagraphs"})
    compiled = torch.compile(model_b, backend="cggr", options=opts)
    key = "selected_indices" if opts.get("granularity", "sequences") == "sequences" else "selected_mask"
    for i in range(steps):
        b = {k: v.to(device) for k, v in batch("llama", seed=i).items()}
        # reference losses far apart (router losses of random tokens lie close): they decide the selection
        reference_loss = torch.linspace(-3.0, 3.0, b["input_ids"].shape[0], device=device).roll(i)
        for m in (model_t, model_b):
            m.zero_grad(set_to_none=True)
        out_t = transformed(**b, reference_loss=reference_loss)
        out_t.loss.backward()
        if positional:  # the wrapper that carries reference_loss still names positional arguments
            out_b = compiled(b["input_ids"], b["attention_mask"], labels=b["labels"], reference_loss=reference_loss)
        else:
            out_b = compiled(**b, reference_loss=reference_loss)
        out_b.loss.backward()
        assert torch.equal(cggr_compile.last_metrics(model_b)[key], out_t[key]), i
        torch.testing.assert_close(out_b.loss, out_t.loss, rtol=1e-5, atol=1e-6)
        for (n, p), q in zip(model_t.named_parameters(), model_b.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=f"step {i}: {n}")
    return model_b, compiled, b, reference_loss


@pytest.mark.parametrize("granularity,positional", [("sequences", False), ("tokens", False), ("sequences", True)])
def test_backend_scores_by_a_batch_carried_reference_loss_like_the_transform(granularity, positional):
    """Dynamo drops the batch's reference_loss (the model never reads it): the first step runs once on
    the tensor the compile saw, then the model is captured again with it as a graph input."""
    model_b, compiled, b, reference_loss = _backend_against_transform(
        dict(OPTS, scoring="reducible", granularity=granularity), positional)
    first, *later = core_of(model_b).routed_graphs
    assert type(first).__name__ == "FirstStepWithoutReferenceInput"
    assert len(later) == 1 and "reference_loss" in later[0].plan.inputs  # captured again once, then reused
    with pytest.raises(RuntimeError, match="ran again the graph it captured before the batch's reference_loss"):
        first(*first.example_inputs[:-1])
    model_b.eval()  # evaluation still runs the plain model, whatever the batch carries
    with torch.no_grad():
        torch.testing.assert_close(compiled(**b, reference_loss=reference_loss).logits, model_b(**b).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Inductor's CUDA graphs)")
def test_backend_with_cudagraphs_scores_by_a_batch_carried_reference_loss():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _backend_against_transform(dict(OPTS, scoring="reducible", cudagraphs=True), device="cuda", steps=4)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_backend_names_scoring_reducible_for_a_batch_carried_reference_loss():
    compiled = torch.compile(tiny_model("llama"), backend="cggr", options=dict(OPTS, scoring="loss"))
    with pytest.raises(Exception, match="carries reference_loss, which only scoring='reducible' reads"):
        compiled(**batch("llama"), reference_loss=torch.zeros(6))


def test_reducible_without_a_reference_names_both_ways_to_give_one():
    cg = cggr_compile.transform(tiny_model("llama"), scoring="reducible", **OPTS)
    with pytest.raises(ValueError, match="needs a reference loss: pass reference_loss=.*reference="):
        cg(**batch("llama"))


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(6, 3), torch.zeros(6, dtype=torch.long)])
def test_reference_loss_of_the_wrong_shape_or_type_is_named(bad):
    cg = cggr_compile.transform(tiny_model("llama"), scoring="reducible", **OPTS)
    with pytest.raises(ValueError, match=r"reference_loss must be a float tensor of shape \(6,\).*\(6, 12\)"):
        cg(**batch("llama"), reference_loss=bad)


def test_reference_options_need_reducible_scoring():
    with pytest.raises(ValueError, match="reference= is only read by scoring='reducible'"):
        cggr_compile.CGGRConfig(reference=tiny_model("llama"))
    cg = cggr_compile.transform(tiny_model("llama"), scoring="loss", **OPTS)
    with pytest.raises(ValueError, match="reference_loss, which only scoring='reducible' reads"):
        cg(**batch("llama"), reference_loss=torch.zeros(6))


def test_plain_calls_ignore_the_reference_loss_column():
    model = tiny_model("llama")
    b = batch("llama")
    cg = cggr_compile.transform(model, scoring="reducible", **OPTS)
    cg.eval()
    torch.testing.assert_close(cg(**b, reference_loss=torch.zeros(6)).logits, model(**b).logits)


def test_reference_losses_from_a_tensor_a_loader_and_a_dataset():
    model = tiny_model("llama")
    ids = torch.randint(2, 64, (5, 9), generator=torch.Generator().manual_seed(3))
    from_tensor = cggr_compile.reference_losses(model, ids, batch_size=2, progress=False)
    logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(from_tensor, nll.mean(1), rtol=1e-5, atol=1e-6)
    loader = torch.utils.data.DataLoader([{"input_ids": r} for r in ids], batch_size=3)
    torch.testing.assert_close(cggr_compile.reference_losses(model, loader, progress=False), from_tensor)
    assert model.training  # restored
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in ids[:, :7]] + [ids[4].tolist()]})
    out = cggr_compile.reference_losses(model, ds, batch_size=4, progress=False)
    assert out.column_names == ["input_ids", "reference_loss"]
    want = cggr_compile.reference_losses(model, ids[:4, :7], progress=False)
    torch.testing.assert_close(torch.tensor(out["reference_loss"][:4]), want, rtol=1e-5, atol=1e-6)
    per_token = cggr_compile.reference_losses(model, ds, per_token=True, progress=False)["reference_loss"]
    assert [len(r) for r in per_token] == [7, 7, 7, 7, 7, 9]


def test_reference_copy_of_the_model_makes_every_row_equally_learnable():
    """Learner = reference: the reducible loss is 0 at every valid position (no row is preferred)."""
    model = tiny_model("llama")
    b = batch("llama")
    cg = cggr_compile.transform(model, scoring="reducible", reference=copy.deepcopy(model), reference_layers=1,
                                **OPTS)
    torch.testing.assert_close(cg.sequence_difficulty(**b), torch.zeros(6), rtol=0, atol=1e-5)
