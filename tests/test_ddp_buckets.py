"""``distributed.compile_in_ddp_buckets``: the backend's compile of a rewritten step cut where DDP's
gradient buckets end (no process group needed: the cut depends only on the parameters' sizes)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from cggr_compile.distributed import active_ddp_bucket_bytes, compile_in_ddp_buckets

WIDTH, LAYERS = 64, 6  # 16 KiB of fp32 weights per layer


def _step(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():  # a router-like prefix without gradients, as in the rewritten step
        score = (x @ weights[0]).square().mean(-1)
    h = x[score.argsort()[-3:]]
    for w in weights:
        h = torch.tanh(h @ w)
    return h.square().mean(), score


def _inputs() -> list[torch.Tensor]:
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH ** 0.5) for _ in range(LAYERS)]
    return [torch.randn(8, WIDTH)] + ws


# DDPOptimizer counts a parameter at each use, so the no-grad prefix (which reads w0 again) becomes a
# piece of its own once the bucket holding the first layer is full.
@pytest.mark.parametrize("layers_per_bucket,pieces", [(1, LAYERS + 1), (2, LAYERS // 2 + 1), (LAYERS * 2, 1)])
def test_cut_follows_the_bucket_size_and_keeps_loss_and_gradients(layers_per_bucket, pieces):
    inputs = _inputs()
    gm = make_fx(_step, pre_dispatch=True)(*inputs)
    compiled_pieces: list[torch.fx.GraphModule] = []

    def compile_piece(piece: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled_pieces.append(piece)
        return piece.forward

    fn = compile_in_ddp_buckets(gm, inputs, compile_piece, bucket_bytes=layers_per_bucket * WIDTH * WIDTH * 4)
    assert len(compiled_pieces) == pieces

    loss, score = fn(*inputs)
    grads = torch.autograd.grad(loss, inputs[1:])
    ref_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ref_loss, ref_score = _step(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs[1:])
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(score, ref_score, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


def test_no_ddp_means_no_cut():
    assert active_ddp_bucket_bytes() is None
