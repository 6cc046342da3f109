"""Fused forward: LM-head matmul, online logsumexp and target logit, one vocabulary slice per program.

The logits exist only as ``[BLOCK_N, BLOCK_V]`` tiles in registers. Program ``(i, s)`` takes row
tile ``i`` of the compacted valid rows and vocabulary slice ``s``, and writes, per row, the
partial ``(max, sum of exp, target logit)`` of its slice, and with ``HAS_ZSUM`` the slice's sum of
the logits (label smoothing needs ``sum_v z_v``); `rho_fused.kernels.merge.merge_partials`
combines the slices. Splitting the vocabulary fills the GPU when the row tiles alone are too few.
fp32 inputs take full-precision (non-TF32) dots, see `dot_precision`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import forward_plan
from .tile import logits_tile


@triton.jit
def forward_kernel(
    H,  # *[N, D] hidden, input dtype
    W,  # *[V, D] weight
    B,  # *[V] bias (any valid pointer when HAS_BIAS is False)
    T,  # *i64 [N] targets
    ROWS,  # *i32 [N] compacted valid rows; ROWS[:COUNT] are used
    COUNT,  # *i32 [1]
    PART_M,  # *f32 [S, N] out: max over the slice of z[n, v]
    PART_S,  # *f32 [S, N] out: sum over the slice of exp(z[n, v] - max)
    PART_T,  # *f32 [S, N] out: z[n, target_n] if the target is in the slice, else 0
    PART_Z,  # *f32 [S, N] out (HAS_ZSUM): sum over the slice of z[n, v]
    N,
    V,
    D,
    v_per_split,  # multiple of BLOCK_V
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ZSUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One grid axis (no 65535 limit on row tiles), the slice index varying fastest: programs in
    # flight together share their row tile of H in L2.
    splits = tl.cdiv(V, v_per_split)
    pid_s = tl.program_id(0) % splits
    pid_n = tl.program_id(0) // splits
    count = tl.load(COUNT)
    if pid_n * BLOCK_N >= count:
        return  # past the valid rows: ignored rows cost nothing
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = pos < count
    rows = tl.load(ROWS + pos, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(T + rows, mask=row_mask, other=0)

    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    zs = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Online logsumexp over the slice, one vocabulary tile at a time:
    #   m' = max(m, max_v z[:, v]);  s' = s * exp(m - m') + sum_v exp(z[:, v] - m')
    # and t picks z[n, target_n] in the tile that holds the target; zs sums z under HAS_ZSUM.
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z, _ = logits_tile(
            H, W, B, rows, row_mask, cols, col_mask, D, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        if HAS_ZSUM:
            zs += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * N + rows
    tl.store(PART_M + out, m, mask=row_mask)
    tl.store(PART_S + out, s, mask=row_mask)
    tl.store(PART_T + out, t, mask=row_mask)
    if HAS_ZSUM:
        tl.store(PART_Z + out, zs, mask=row_mask)


@dataclass(frozen=True)
class ForwardConfig:
    """Tile shape and launch options. ``splits=None``: enough vocabulary slices to fill the GPU
    (`rho_fused.kernels.plan.forward_plan`)."""

    block_n: int = 128
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 4  # H200, bf16: 0.83x the time of 3 stages, no spills on sm80/sm90 (bench/NOTES.md)
    splits: int | None = None


def default_config(dtype: torch.dtype) -> ForwardConfig:
    """The configuration the launcher uses: 128 x 128 x 64 tiles for 16-bit inputs (tensor cores);
    fp32 inputs take full-precision FMA dots, which spill at that size: 64 x 128 x 16, two stages."""
    if dtype == torch.float32:
        return ForwardConfig(block_n=64, block_v=128, block_d=16, num_stages=2)
    return ForwardConfig()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full fp32 products ("ieee": FMA dots, not TF32, whatever
    ``torch.backends.cuda.matmul.allow_tf32`` says), as the contract asks; 16-bit inputs use the
    tensor cores (the "tf32" setting only matters for fp32 operands)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def logsumexp_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor,
    count: torch.Tensor,
    softcap: float | None,
    config: ForwardConfig | None = None,
    z_sum: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Partial ``(max, sumexp, target logit)`` per vocabulary slice, each fp32 ``[S, N]``, and with
    ``z_sum`` a fourth, the slice's sum of the logits.

    ``hidden [N, D]``, ``weight [V, D]``, ``bias [V]`` contiguous and of one dtype; ``rows[:count]``
    the valid rows (from `rho_fused.kernels.compact.compact_mask`). Only those rows of the outputs
    are written.
    """
    cfg = config or default_config(hidden.dtype)
    n, d = hidden.shape
    v = weight.shape[0]
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else None
    plan = forward_plan(n, v, sms, cfg)
    part = torch.empty(4 if z_sum else 3, plan.splits, n, dtype=torch.float32, device=hidden.device)
    grid = (plan.programs,)
    if n > 0:
        forward_kernel[grid](
            hidden, weight, weight if bias is None else bias, targets, rows, count,
            part[0], part[1], part[2], part[3] if z_sum else part[2],
            n, v, d, plan.v_per_split, 1.0 if softcap is None else softcap,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ZSUM=z_sum,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            DOT_PRECISION=dot_precision(hidden.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return tuple(part.unbind(0))
