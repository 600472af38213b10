"""passes/pipeline: the passes run from one ordered list, each records what it did, and the debug
switch dumps the graph between passes."""

from __future__ import annotations

import pytest
import torch

from cggr_compile.backend import core_of
from cggr_compile.passes import pipeline
from cggr_compile.passes.pass_context import PassContext, record_pass
from models import batch, tiny_model

OPTS = dict(strict=True, router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False,
            selection="topk")


def _routed_gm(**data):
    model = tiny_model("llama")
    torch.compile(model, backend="cggr", options=OPTS)(**(data or batch("llama")))
    (gm,) = core_of(model).routed_graphs[0].graphs.values()
    return gm


def test_every_pass_of_the_list_ran_in_order_and_said_what_it_did():
    gm = _routed_gm()
    records = gm.meta["cggr_passes"]
    assert [r["pass"] for r in records] == ["trace_routed_step", "fuse_scorer", "check_fused_loss"]
    assert [p.__name__ for p in pipeline.PASSES] == [r["pass"] + "_pass" for r in records]
    assert all(r["summary"] for r in records)
    assert records[1]["summary"] == gm.meta["cggr_fuse_scorer"] and records[2]["summary"] == gm.meta["cggr_fused_loss"]
    assert records[2]["changed"] is False  # analysis only


def test_dump_switch_writes_the_graph_after_every_pass(tmp_path, monkeypatch):
    monkeypatch.setenv(pipeline.DUMP_ENV, str(tmp_path))
    _routed_gm()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_trace_routed_step.txt", "01_fuse_scorer.txt", "02_check_fused_loss.txt"]
    assert "index_select" in (tmp_path / files[-1]).read_text()


def test_dump_switch_prints_to_stderr(monkeypatch, capsys):
    monkeypatch.setenv(pipeline.DUMP_ENV, "1")
    _routed_gm()
    err = capsys.readouterr().err
    assert err.count("# cggr: the graph after pass") == len(pipeline.PASSES)


def test_a_pass_that_records_nothing_fails_the_pipeline():
    def silent(gm, context):
        return gm

    def noisy(gm, context):
        record_pass(gm, "noisy", "did nothing", changed=False)
        return gm

    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    context = PassContext(None, None, None, [], {})
    assert pipeline.run_passes(gm, context, [noisy]).meta["cggr_passes"][-1]["pass"] == "noisy"
    with pytest.raises(AssertionError, match="silent recorded nothing"):
        pipeline.run_passes(gm, context, [silent])
