"""Exact selection over every rank of a process group (``scope="global"``), values never gathered.

The ``n_keep``-th largest excess over all ranks is found by a radix select on order-preserving
integer keys: four passes of 8 bits, each summing a 256-bin histogram across ranks with one
``all_reduce``, so the traffic does not grow with the world size. Ties at the threshold go to
the lower global index (rank order, then position), which needs each rank's tie count.
Every rank runs every collective, including a rank with no valid token; apart from
the collectives themselves nothing here reads a value back to the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .problem import keep_count

DIGIT_BITS = 8
SIGN = 1 << 31
MASK32 = (1 << 32) - 1


def order_keys(x: Tensor) -> Tensor:
    """fp32 values as int64 keys in ``[0, 2^32)`` with the same order (``-0.0`` equals ``+0.0``).

    IEEE floats order like sign-magnitude integers: flip every bit of a negative value and
    only the sign bit of a positive one, and unsigned order is float order. Every NaN, whatever
    its sign bit, gets the one key above ``+inf``, where torch's sort puts NaN.
    """
    x = x.float() + 0.0
    bits = torch.where(x.isnan(), 0x7FC00000, x.view(torch.int32).to(torch.int64) & MASK32)
    return torch.where(bits >= SIGN, bits ^ MASK32, bits | SIGN)


def key_to_float(key: Tensor) -> Tensor:
    """Inverse of `order_keys` for one key."""
    bits = torch.where(key >= SIGN, key ^ SIGN, key ^ MASK32)
    return (bits - (bits >= SIGN).long() * (1 << 32)).to(torch.int32).view(torch.float32)


def global_select(
    excess: Tensor, valid: Tensor, keep_ratio: float, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep the global top ``keep_ratio`` of valid tokens by excess, over all ranks of ``group``.

    ``excess`` and ``valid`` are this rank's ``[N]`` tokens. Returns ``(kept [N] bool, threshold,
    n_keep, n_valid)``: the last three are those of the one global group, shape ``[1]`` (per group,
    as `rho_fused.selection.select_top` gives them), the same on every rank.
    """
    n_valid = valid.sum().reshape(1)
    dist.all_reduce(n_valid, group=group)
    n_keep = keep_count(n_valid, keep_ratio)

    keys = order_keys(excess)
    candidates = valid.clone()  # tokens that still share the threshold's leading digits
    remaining = n_keep.clone()  # how many of the candidates are still to be kept
    threshold = torch.zeros_like(n_keep)
    for shift in range(32 - DIGIT_BITS, -1, -DIGIT_BITS):
        digit = (keys >> shift) & ((1 << DIGIT_BITS) - 1)
        # Scatter-add of the candidate mask, not bincount of the masked digits: no host sync.
        hist = torch.zeros(1 << DIGIT_BITS, dtype=torch.int64, device=keys.device)
        hist.scatter_add_(0, digit, candidates.long())
        dist.all_reduce(hist, group=group)
        # at_least[d] = candidates whose digit is >= d; the threshold's digit is the largest d
        # with at_least[d] >= remaining, and the candidates above it are all kept.
        at_least = hist.flip(0).cumsum(0).flip(0)
        d = (at_least >= remaining).sum().reshape(1) - 1
        # gather, not at_least[d]: indexing by a tensor reads the index back to the host
        remaining -= at_least.gather(0, d) - hist.gather(0, d)
        candidates &= digit == d
        threshold |= d << shift

    # Keys above the threshold are kept; of the keys equal to it, the first `remaining` in
    # global order: ranks before this one take theirs first.
    tied = valid & (keys == threshold)
    counts = [torch.zeros_like(n_valid) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, tied.sum().reshape(1), group=group)
    before = torch.stack(counts[: dist.get_rank(group)]).sum() if dist.get_rank(group) else 0
    take = (remaining - before).clamp(min=0)
    kept = valid & (keys > threshold) | tied & (tied.cumsum(0) <= take)
    kept &= n_keep > 0
    value = torch.where(
        n_keep > 0, key_to_float(threshold), torch.full_like(threshold, float("inf"), dtype=torch.float32)
    )
    return kept, value.to(excess.dtype), n_keep, n_valid
