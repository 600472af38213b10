"""Every bad input of SPEC.md gets a clear error that says what to change."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import cggr_compile
from cggr_compile.config import CGGRConfig
from cggr_compile.errors import CGGRFallbackWarning
from models import ARCHITECTURES, batch, tiny_model


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "0.5", True])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"min_tokens_ratio must be a number in \(0, 1\]"):
        CGGRConfig(min_tokens_ratio=ratio)


def test_unknown_scoring_and_selection_and_granularity():
    with pytest.raises(ValueError, match="unknown scoring 'perplexity'; choose one of entropy, margin, loss, combined"):
        CGGRConfig(scoring="perplexity")
    with pytest.raises(ValueError, match="unknown selection 'random'; choose one of truncation, topk"):
        CGGRConfig(selection="random")
    with pytest.raises(ValueError, match="unknown granularity 'rows'"):
        CGGRConfig(granularity="rows")
    with pytest.raises(ValueError, match="needs granularity='tokens'"):
        CGGRConfig(selection="sequence_aware")


def test_unknown_option_name():
    with pytest.raises(TypeError, match="unknown CGGR option.*'ratio'.*valid options are"):
        CGGRConfig.from_options({"ratio": 0.5})


@pytest.mark.parametrize("layers", [3, 7])
def test_router_layers_out_of_range(layers):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"router_layers=\d+ is out of range .* use 1 <= router_layers < 3"):
        cggr_compile.transform(model, router_layers=layers)
    with pytest.raises(ValueError, match=r"router_layers=0 is out of range: use an integer with 1 <= router_layers"):
        cggr_compile.transform(model, router_layers=0)


def test_labels_of_another_shape():
    cg = cggr_compile.transform(tiny_model("llama"), router_layers=1)
    b = batch("llama")
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(6, 12\), got \(6, 11\)"):
        cg(input_ids=b["input_ids"], labels=b["labels"][:, 1:])


@pytest.mark.parametrize("ids", [torch.zeros(12, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.long),
                                 torch.zeros(2, 12), "not a tensor"])
def test_inputs_not_batch_seq_integers(ids):
    cg = cggr_compile.transform(tiny_model("llama"), router_layers=1)
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, seq\) integer tensor"):
        cg(input_ids=ids, labels=torch.zeros(2, 12, dtype=torch.long))


def test_backend_rejects_bad_options_with_the_config_message():
    model = tiny_model("llama")
    b = batch("llama")
    compiled = torch.compile(model, backend="cggr", options={"min_tokens_ratio": 2.0})
    with pytest.raises(Exception, match=r"min_tokens_ratio must be a number in \(0, 1\]"):
        compiled(**b)


class _Unrecognised(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.out = torch.nn.Linear(8, 16)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.emb(input_ids))


def test_unrecognised_model_in_strict_mode_is_an_error():
    from cggr_compile.errors import CGGRFallbackError

    with pytest.raises(CGGRFallbackError, match="whole model is used as the router.*strict=True"):
        cggr_compile.transform(_Unrecognised(), router_layers=1, strict=True)


def test_unrecognised_model_trains_with_whole_model_router_and_warns():
    Tiny = _Unrecognised

    with pytest.warns(UserWarning) as record:
        cg = cggr_compile.transform(Tiny(), router_layers=1, warmup_steps=0, dynamic_threshold=False)
    messages = [str(w.message) for w in record]
    assert any(re.search("whole model is used as the router.*Pass router=", m) for m in messages), messages
    # the default scoring, the learned exit, needs hidden states the whole model does not give
    assert any("scoring by the router's loss instead" in m for m in messages), messages
    assert cg.cggr_config.scoring == "loss" and cg.exit is None
    assert cg.router(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 16)
    ids = torch.randint(0, 16, (4, 5))
    out = cg(input_ids=ids, labels=ids)  # trains, with the whole model as router
    out.loss.backward()
    assert out.logits.shape[0] == 1 and cg.model.emb.weight.grad is not None


def test_importance_selection_options():
    with pytest.raises(ValueError, match="selection='importance' draws whole rows .* needs granularity='sequences'"):
        CGGRConfig(selection="importance", granularity="tokens")
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"importance_floor must be a number in \[0, 1\]"):
            CGGRConfig(selection="importance", importance_floor=bad)
    CGGRConfig(selection="importance", importance_floor=0)  # the bounds are allowed
    CGGRConfig(selection="importance", importance_floor=1.0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_router_layers_beyond_the_depth_is_an_error_on_every_entry_point(name):
    """Transform and backend alike (the backend used to fall back with a warning, training the
    whole batch): the message names the model's depth."""
    match = r"router_layers=3 is out of range for this .* with 3 layers: use 1 <= router_layers < 3"
    with pytest.raises(ValueError, match=match):
        cggr_compile.transform(tiny_model(name), router_layers=3)
    compiled = torch.compile(tiny_model(name), backend="cggr", options={"router_layers": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an error, not a fallback (the fallback's warning is an error in tests)
        with pytest.raises(Exception, match=match) as err:  # Dynamo wraps it (BackendCompilerFailed)
            compiled(**batch(name))
    assert not isinstance(err.value, CGGRFallbackWarning)


@pytest.mark.parametrize("out", ["per_sequence", "wrong_length", "4d"])
def test_user_router_of_the_wrong_shape(out):
    b = batch("llama")
    ids = b["input_ids"]

    def router(input_ids, attention_mask):
        if out == "per_sequence":
            return input_ids.float().mean(-1)  # [B]
        if out == "wrong_length":
            return input_ids[:, 1:].float()  # [B, T - 1]
        return input_ids.float()[..., None, None]  # [B, T, 1, 1]

    cg = cggr_compile.transform(tiny_model("llama"), router=router, router_layers=1, strict=True)
    with pytest.raises(ValueError, match=r"the router returned a tensor of shape .*logits \[B, T, V\] or one "
                                         rf"difficulty per token \[B, T\].*{tuple(ids.shape)}.*\[:, None\]"):
        cg(**b)
    compiled = torch.compile(tiny_model("llama"), backend="cggr", options={"router": router, "router_layers": 1})
    with pytest.raises(Exception, match=r"the router returned a tensor of shape"):
        compiled(**b)
