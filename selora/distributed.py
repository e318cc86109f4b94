"""DeepSpeed ZeRO helpers. Everything that must see a *whole* parameter while ZeRO-3 holds only shards goes
through `gathered`; everything that spreads work over ranks uses `assign_owners` and `broadcast_object`.

Without torch.distributed (a plain script, a notebook) every helper degrades to the single-process answer.
"""
from __future__ import annotations

import contextlib
import heapq
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries DeepSpeed's ds_id)."""
    return hasattr(param, "ds_id")


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3 partitioned ``params`` whole inside the block (a no-op for ordinary tensors).

    Every rank must enter the block (it is a collective). With ``modifier_rank`` set, what that rank writes
    into the gathered tensors is re-partitioned to all ranks on exit.
    """
    partitioned = [p for p in params if p is not None and is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed  # only needed when parameters really are partitioned

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def module_params(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters(recurse=True))


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank for each job, balancing total cost (longest-processing-time-first greedy)."""
    loads = [(0.0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: -costs[j]):
        load, rank = heapq.heappop(loads)
        owners[job] = rank
        heapq.heappush(loads, (load + costs[job], rank))
    return owners


def broadcast_tensors(tensors: list[torch.Tensor], src: int) -> list[torch.Tensor]:
    """Send ``tensors`` (valid on ``src`` only; shapes/dtypes must already agree on all ranks) to every rank."""
    if world()[1] == 1:
        return tensors
    for tensor in tensors:
        dist.broadcast(tensor, src=src)
    return tensors


def broadcast_object(obj, src: int = 0):
    """A picklable Python object from ``src`` to every rank (small metadata only)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
