"""passes/recognise_training_graph: which inputs, outputs and loss it finds, and when it refuses."""

from __future__ import annotations

import pytest
import torch

from cggr_compile.passes.recognise_training_graph import NotRewritable, recognise
from models import batch, tiny_model
from pass_helpers import capture


def test_finds_inputs_loss_and_logits_of_a_llama_training_graph():
    model = tiny_model("llama")
    b = batch("llama")
    got = capture(model, **b)
    plan = recognise(got["gm"], got["example_inputs"], got["kwargs"])
    assert plan.batch == 6
    for name in ("input_ids", "attention_mask", "labels"):
        assert got["example_inputs"][plan.inputs[name]] is b[name]
    outs = next(n for n in got["gm"].graph.nodes if n.op == "output").args[0]
    assert outs[plan.loss_output].meta["example_value"].dim() == 0
    assert tuple(outs[plan.logits_output].meta["example_value"].shape) == (6, 12, 64)
    params = {id(p) for p in model.parameters()}
    assert {id(got["example_inputs"][p]) for p in plan.others} >= params


def test_labels_that_are_the_input_ids_share_one_placeholder():
    model = tiny_model("llama")
    ids = batch("llama")["input_ids"]
    got = capture(model, input_ids=ids, labels=ids)
    plan = recognise(got["gm"], got["example_inputs"], got["kwargs"])
    assert plan.inputs["input_ids"] == plan.inputs["labels"]


def test_refuses_without_labels_and_says_why():
    model = tiny_model("llama")
    got = capture(model, input_ids=batch("llama")["input_ids"])
    with pytest.raises(NotRewritable, match="without labels"):
        recognise(got["gm"], got["example_inputs"], got["kwargs"])


def test_refuses_a_custom_loss_and_names_the_remedy():
    model = tiny_model("llama")
    b = batch("llama")
    errors = []

    def backend(gm, ex, **_):
        # inside the backend: Dynamo drops the placeholders' sources once compilation is over
        try:
            recognise(gm, ex)
        except NotRewritable as err:
            errors.append(str(err))
        return gm.forward

    torch.compile(lambda input_ids, labels: model(input_ids=input_ids).logits.square().mean() + labels.sum() * 0,
                  backend=backend)(b["input_ids"], b["labels"])
    assert len(errors) == 1
    assert "expected one cross-entropy loss" in errors[0] and "cggr_compile.transform" in errors[0]
