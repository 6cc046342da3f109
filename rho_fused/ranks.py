"""Data-parallel runs: rank and world size, the process group, each rank's share, what rank 0 alone does.

Every function here also works on one process, as rank 0 of a world of 1: the collectives are then
the identity. The command line starts the process group from torchrun's environment
(`process_group_from_env`); the library only reads it (`rank_and_world`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when torch.distributed is not running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice ``[lo, hi)`` of ``n`` items that rank ``rank`` of ``world`` holds.

    Contiguous, in rank order: rank 0 holds the first items, so "rank order, then position" (the
    tie order of ``scope="global"``) is the order of the items in the unsharded batch.
    """
    return rank * n // world, (rank + 1) * n // world


def loss_scope(scope: str, world: int) -> str:
    """The scope a loss runs with on ``world`` ranks: ``"global"`` (all ranks' tokens together) is ``"batch"`` on one.

    On one process the two select the same tokens; ``"batch"`` needs no process group.
    """
    return "batch" if scope == "global" and world <= 1 else scope


def ddp_sum_factor(world: int) -> int:
    """What a rank's loss is multiplied by for DDP to leave the *sum* of the ranks' gradients: ``world``.

    DDP averages gradients over ranks, so a loss whose global gradient is the sum of the ranks'
    gradients is multiplied by the world size. That is the case whenever each rank's loss is its
    share of one global loss, such as its summed kept cross-entropy divided by the kept count of the
    whole global batch. After DDP's all-reduce every rank then holds the gradient that one process
    computes on the global batch, so clipping and the optimizer step are those of one process.
    """
    return world


def wrap_for_ranks(module: nn.Module, world: int) -> nn.Module:
    """``module`` itself on one process; in `DistributedDataParallel` on several.

    DDP broadcasts rank 0's parameters and buffers when it is built, so every rank starts from the
    same weights, and all-reduces the gradients in backward (see `ddp_sum_factor`).
    """
    if world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over all ranks (in float64, through ``device``); every rank must call."""
    if rank_and_world()[1] <= 1:
        return [float(v) for v in values]
    sums = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums.cpu().tolist()


def min_over_ranks(value: float, device: torch.device) -> float:
    """The smallest ``value`` over all ranks (through ``device``); every rank must call."""
    if rank_and_world()[1] <= 1:
        return float(value)
    low = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float(low)


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object); every rank must call, the others' ``obj`` is unused."""
    if rank_and_world()[1] <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank_zero(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the others. Every rank must call."""
    rank, world = rank_and_world()
    if world <= 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.gather_object(obj, gathered if rank == 0 else None, dst=0)
    return gathered if rank == 0 else None


def print_on_rank_zero(text: str) -> None:
    """Print on rank 0 only: one line for the whole run."""
    if rank_and_world()[0] == 0:
        print(text, flush=True)


def launched_world() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank_label() -> str:
    """``" (rank R of W)"`` under torchrun with several processes, else ``""``: for messages, readable at any time."""
    world = launched_world()
    return f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""


def local_device(name: str | None) -> str:
    """The device to run on (default: cuda when available); under torchrun on CUDA, this process's GPU.

    The GPU of a process is the one numbered ``LOCAL_RANK``.
    """
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and launched_world() > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextlib.contextmanager
def process_group_from_env(device: str | None) -> Iterator[int]:
    """Initialise torch.distributed from torchrun's environment (``WORLD_SIZE`` > 1); yield the rank.

    ``nccl`` for CUDA devices (after selecting the GPU ``LOCAL_RANK``), ``gloo`` otherwise. Without
    torchrun (or with one process) nothing is initialised and the rank is 0; a group already
    initialised is used as it is. A group started here is destroyed on the way out, after a
    barrier: no rank tears down while another (rank 0, writing) still needs it.
    """
    if launched_world() <= 1 or dist.is_initialized():
        yield rank_and_world()[0]
        return
    device = local_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield dist.get_rank()
        dist.barrier()
    finally:
        dist.destroy_process_group()
