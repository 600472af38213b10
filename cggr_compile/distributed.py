"""Loss normalisation across data-parallel ranks.

DDP and FSDP2 average gradients over ranks. For every selected token to weigh the same across
ranks (SPEC.md), each rank divides its summed loss by ``(selected tokens on all ranks) / world``:
the average of the ranks' gradients is then the gradient of the mean over all selected tokens.
The count is one scalar all-reduce per step (a functional collective, traceable by Dynamo, with no
host synchronisation); the router itself adds no collective and no parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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
