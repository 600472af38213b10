"""Data parallel on the CPU (gloo, 2 processes): DDP over the CGGR module gives, after one step,
the gradients of one process training on the union of the ranks' selected rows, every selected
token weighing the same."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

OPTS = dict(router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False, scoring="loss")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, compiled: bool) -> None:
    import cggr_compile
    from models import batch, tiny_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        cg = cggr_compile.transform(model, **OPTS)
        ddp = torch.nn.parallel.DistributedDataParallel(cg)
        step = torch.compile(ddp, backend="eager") if compiled else ddp
        b = batch("llama", seed=10 + rank)
        out = step(**b)
        out.loss.backward()
        torch.save({"idx": out.selected_indices, "grads": {n: p.grad for n, p in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True])
def test_ddp_gradients_equal_one_process_on_the_union_of_selected_rows(tmp_path, compiled):
    from models import batch, tiny_model

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), compiled), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for n in r0["grads"]:  # DDP left the same averaged gradient on both ranks
        torch.testing.assert_close(r0["grads"][n], r1["grads"][n])

    model = tiny_model("llama")
    b0, b1 = batch("llama", seed=10), batch("llama", seed=11)
    ids = torch.cat([b0["input_ids"][r0["idx"]], b1["input_ids"][r1["idx"]]])
    mask = torch.cat([b0["attention_mask"][r0["idx"]], b1["attention_mask"][r1["idx"]]])
    labels = torch.cat([b0["labels"][r0["idx"]], b1["labels"][r1["idx"]]])
    logits = model(input_ids=ids, attention_mask=mask).logits
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    keep = (target != -100) & (mask == 1)
    torch.nn.functional.cross_entropy(logits[keep], target[keep]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(r0["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
