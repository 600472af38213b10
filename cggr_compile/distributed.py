"""Data parallel: loss normalisation across ranks, and the backend's compile cut at DDP's buckets.

DDP and FSDP2 average gradients over ranks. For every selected token to weigh the same across
ranks (SPEC.md), each rank divides its summed loss by ``(selected tokens on all ranks) / world``:
the average of the ranks' gradients is then the gradient of the mean over all selected tokens.
The count is one scalar all-reduce per step (a functional collective, traceable by Dynamo, with no
host synchronisation); the router itself adds no collective and no parameter.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import Tensor


def data_parallel_world() -> int:
    """The number of ranks when a default process group is up, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank_normaliser(selected: Tensor) -> Tensor:
    """``sum over ranks of selected / world``: the denominator of this rank's summed loss."""
    world = data_parallel_world()
    if world == 1:
        return selected
    import torch.distributed._functional_collectives as funcol

    total = funcol.all_reduce(selected.to(torch.float32), "sum", dist.group.WORLD)
    return total / world


def active_ddp_module() -> Optional[torch.nn.Module]:
    """The ``DistributedDataParallel`` whose forward is running (Dynamo captures inside it), else None."""
    try:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel._get_active_ddp_module()
    except Exception:  # noqa: BLE001 - no DDP (or a torch without this private API)
        return None


def active_ddp_bucket_bytes() -> Optional[int]:
    """DDP's bucket size when Dynamo is capturing inside a ``DistributedDataParallel`` forward, else None."""
    ddp = active_ddp_module()
    return int(ddp.bucket_bytes_cap) if ddp is not None else None


def compile_in_ddp_buckets(
    gm: fx.GraphModule, example_inputs: Sequence[Any], compile_fn: Callable, bucket_bytes: int,
) -> Callable:
    """Compile ``gm`` cut where DDP's gradient buckets end, each piece with ``compile_fn``.

    Why: compiled whole, the step's backward is one autograd node, so DDP's all-reduces all wait for
    its end. Cut into pieces (Dynamo's own DDPOptimizer, applied to the rewritten step, which the
    backend only sees when ``optimize_ddp`` is off), each piece's gradients are reduced while the
    earlier pieces' backward runs. The parameters are the graph inputs that are ``nn.Parameter``s.
    """
    from torch._dynamo.backends.distributed import DDPOptimizer

    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        node.meta.setdefault("example_value", value)  # where DDPOptimizer looks for an input's parameter
        if not hasattr(node, "_dynamo_source"):  # DDPOptimizer hands each piece its inputs' sources
            node._dynamo_source = None  # type: ignore[attr-defined]
    if not hasattr(gm, "_param_name_to_source"):
        gm._param_name_to_source = {}  # type: ignore[assignment]
    # DDP's own first bucket is the smaller of its default (1 MiB) and the bucket size
    first = min(getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", bucket_bytes), bucket_bytes)
    splitter = DDPOptimizer(bucket_bytes_cap=bucket_bytes, backend_compile_fn=compile_fn, first_bucket_cap=first)
    return splitter.compile_fn(gm, list(example_inputs))
