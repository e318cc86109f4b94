"""DeepSpeed ZeRO helpers. Everything that must see a *whole* parameter while ZeRO-3 holds only shards goes
through `gathered` (or `gather_to_owner`, which makes it whole on one rank only); work spread over ranks is
placed by `assign_owners` and its results sent to all by `broadcast_tensors`.

Without torch.distributed (a plain script, a notebook) every helper degrades to the single-process answer.
"""
from __future__ import annotations

import contextlib
import heapq
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist


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
    params = [p for p in params if p is not None and is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed  # only needed when parameters really are partitioned
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if modifier_rank is not None:
        # A write goes through GatheredParameters, which sends the modifier's values to every rank and partitions
        # them again on leaving, also for a weight ZeRO-3 keeps whole between steps (a persistent one: every
        # weight on one rank). A weight a running module's forward holds would be freed under it: refused.
        if any(p.ds_status == ZeroParamStatus.AVAILABLE and p.ds_active_sub_modules for p in params):
            raise RuntimeError("cannot modify a ZeRO-3 parameter that a running forward holds; modify it between "
                               "steps")
        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
        return
    # A read: a weight ZeRO-3 already holds whole (inside a module's forward, or persistent) is read as it is;
    # gathering it again would free it on leaving, under the module's feet.
    partitioned = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not partitioned:
        yield
        return
    with deepspeed.zero.GatheredParameters(partitioned):
        yield


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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ----- writing into parameters that ZeRO may hold as shards -------------------------------------------------
def _has_master_copy(param: torch.Tensor) -> bool:
    """True if a DeepSpeed optimizer keeps an fp32 master copy of ``param`` (ZeRO 1/2/3 after initialize)."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer")


def _shard_range(param: torch.Tensor) -> tuple[int, int]:
    """[start, end) of this rank's ZeRO-3 shard in the flattened parameter (the padding excluded)."""
    rank = world()[0]
    size = param.ds_tensor.ds_numel
    start = rank * size
    return start, min(start + size, param.ds_numel)


@torch.no_grad()
def full_value(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter as a float32 copy on every rank (small adapter tensors only)."""
    with gathered([param]):
        return param.detach().float().clone()


@torch.no_grad()
def set_full_value(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` to ``value`` (the whole tensor, identical on every rank), including ZeRO's shard and the
    optimizer's fp32 master copy, so the next optimizer step starts from ``value``."""
    if is_partitioned(param):
        start, end = _shard_range(param)
        shard = param.ds_tensor
        shard.data[: end - start].copy_(value.reshape(-1)[start:end].to(shard.dtype))
        _refresh_whole_copy(param)
    else:
        param.data.copy_(value.to(param.dtype))
    if _has_master_copy(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())


@torch.no_grad()
def add_low_rank(param: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """param (out, in) += left (out, k) @ right (k, in), touching only this rank's shard under ZeRO-3."""
    if not is_partitioned(param):
        param.data.add_((left.float() @ right.float()).to(param.dtype))
        return
    start, end = _shard_range(param)
    if end > start:
        columns = param.ds_shape[1]
        first_row, last_row = start // columns, (end - 1) // columns
        block = (left[first_row:last_row + 1].float() @ right.float()).reshape(-1)
        offset = first_row * columns
        shard = param.ds_tensor
        shard.data[: end - start].add_(block[start - offset:end - offset].to(shard.dtype))
    _refresh_whole_copy(param)


def whole_is_its_partition(param: torch.Tensor) -> bool:
    """Whether a gathered ZeRO-3 weight's whole is a view of this rank's partition rather than a copy beside it
    (one rank: DeepSpeed gathers several weights as views, a lone one into a new buffer)."""
    return param.data_ptr() == param.ds_tensor.data_ptr()


def _refresh_whole_copy(param: torch.Tensor) -> None:
    """After a write into this rank's shard: a weight ZeRO-3 holds whole between steps (a persistent one, e.g. the
    adapter factors under the recipe's threshold on several ranks) keeps a copy besides its shard, stale now, which
    the next forward would use; it is gathered again from the shards. Every rank must call it (a collective). On
    one rank the copy is usually a view of the shard (nothing to do); a weight DeepSpeed gathered alone is a copy
    there too, and is gathered again like the others."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status != ZeroParamStatus.AVAILABLE or whole_is_its_partition(param):
        return
    param.partition(has_been_updated=False)  # drops the stale copy; the shard is the truth
    param.all_gather()


def reset_optimizer_rows(optimizer, param: torch.Tensor, rows: torch.Tensor) -> int:
    """Zero the optimizer moments of ``rows`` (first dim) of ``param``; returns how many state tensors were reset.

    Works for torch optimizers and for DeepSpeed's ZeRO 1/2/3 optimizers (through their full-state API).
    """
    if optimizer is None:
        return 0
    if _has_master_copy(param):
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

        reset = 0
        for key in ("exp_avg", "exp_avg_sq"):
            state = safe_get_full_optimizer_state(param, key)
            if state is None:
                continue
            state = state.clone()
            state[rows] = 0
            safe_set_full_optimizer_state(param, state, key)
            reset += 1
        return reset
    inner = getattr(optimizer, "optimizer", optimizer)
    state = inner.state.get(param, {})
    reset = 0
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape[:1] == param.shape[:1] and value.dim() == param.dim():
            value[rows] = 0
            reset += 1
    return reset


def gather_to_owner(param: torch.Tensor, owner: int) -> torch.Tensor | None:
    """The whole (out, in) parameter on ``owner`` only (None elsewhere); a collective under ZeRO-3.

    Only the owner ever holds the full weight, so spreading owners spreads the memory too.
    """
    if not is_partitioned(param):
        return param.data if world()[0] == owner else None
    rank, world_size = world()
    shard = param.ds_tensor.data
    if rank == owner:
        pieces = [torch.empty_like(shard) for _ in range(world_size)]
        dist.gather(shard, pieces, dst=owner)
        return torch.cat(pieces)[: param.ds_numel].view(param.ds_shape)
    dist.gather(shard, None, dst=owner)
    return None
