"""Stream compaction: the indices of the set entries of a mask, in order, and their count.

Used twice per loss call: the valid rows before the forward (so ignored rows cost nothing) and
the kept rows before the backward (so the backward runs over kept rows only). The count stays on
the device; the kernels that consume the list read it and let programs past it exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def compact_kernel(
    MASK,  # *u8 [N]: nonzero where the row is selected
    IDX,  # *i32 [N] out: selected row indices first, in increasing order; the tail is left untouched
    COUNT,  # *i32 [1] out: number of selected rows
    N,
    BLOCK: tl.constexpr,
):
    """``IDX[0:COUNT] = [i for i in range(N) if MASK[i]]``, one program, ``N / BLOCK`` steps.

    A single program keeps the output in index order without a second pass; at N = 32k tokens it
    is a few dozen vector steps, negligible beside the matmuls.
    """
    total = tl.zeros([], dtype=tl.int32)
    # Exclusive prefix sum of the mask within each block, offset by the count of earlier blocks:
    #   pos_i = total + sum_{j < i in block} mask_j
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        sel = (tl.load(MASK + offs, mask=offs < N, other=0) != 0).to(tl.int32)
        pos = total + tl.cumsum(sel, axis=0) - sel
        tl.store(IDX + pos, offs, mask=sel != 0)
        total += tl.sum(sel, axis=0)
    tl.store(COUNT, total)


@dataclass(frozen=True)
class CompactConfig:
    block: int = 1024
    num_warps: int = 4
    num_stages: int = 1


# What the launcher uses when given no config (tests swap in smaller blocks).
DEFAULT_CONFIG = CompactConfig()


def compact_mask(mask: torch.Tensor, config: CompactConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx int32 [N], count int32 [1])``: ``idx[:count]`` are the set positions of ``mask``, in order.

    Entries of ``idx`` past ``count`` are unspecified. No host synchronisation.
    """
    cfg = config or DEFAULT_CONFIG
    n = mask.shape[0]
    idx = torch.empty(n, dtype=torch.int32, device=mask.device)
    count = torch.empty(1, dtype=torch.int32, device=mask.device)
    if n == 0:
        count.zero_()
        return idx, count
    compact_kernel[(1,)](
        mask.view(torch.uint8), idx, count, n, BLOCK=cfg.block, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )
    return idx, count
