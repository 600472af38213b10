"""passes/check_fused_loss (analysis only): the fused loss op is in the traced step exactly when it
was chosen, and the reason is recorded; the graph is never changed."""

from __future__ import annotations

import pytest
import torch

from cggr_compile.passes.check_fused_loss import check_fused_loss
from cggr_compile.passes.fuse_loss import FusedLoss


def _plain_graph():
    return torch.fx.symbolic_trace(torch.nn.Linear(2, 2))


def test_records_the_reason_and_changes_nothing():
    gm = _plain_graph()
    code = gm.code
    assert check_fused_loss(gm, FusedLoss("fused_loss=False")) == "fused_loss=False"
    assert gm.meta["cggr_fused_loss"] == "fused_loss=False" and gm.code == code


def test_a_chosen_fusion_missing_from_the_graph_is_an_error():
    chosen = FusedLoss("fused: llama head 64x32", head=torch.nn.Linear(2, 2))
    with pytest.raises(AssertionError, match="0 fused loss nodes"):
        check_fused_loss(_plain_graph(), chosen)
