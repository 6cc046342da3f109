"""Forward epilogue: merge the vocabulary slices' partial logsumexps into ``lse``, ``ce`` and ``excess``
(and their partial sums of the logits into ``sum_v z_v``, for label smoothing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def merge_kernel(
    PART_M,  # *f32 [S, N]
    PART_S,  # *f32 [S, N]
    PART_T,  # *f32 [S, N]
    PART_Z,  # *f32 [S, N] (HAS_ZSUM): partial sums of the logits
    T,  # *i64 [N] targets
    REF,  # *f32 [N] reference loss (any valid pointer when HAS_REF is False)
    LSE,  # *f32 [N] out
    CE,  # *f32 [N] out
    EXCESS,  # *f32 [N] out
    ZSUM,  # *f32 [N] out (HAS_ZSUM): sum_v z_v, 0 at ignored rows
    N,
    S,
    ignore_index,
    HAS_REF: tl.constexpr,
    HAS_ZSUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per row: ``lse = M + log(sum_s s_s * exp(m_s - M))`` with ``M = max_s m_s``,
    ``ce = lse - sum_s t_s`` (one slice holds the target), ``excess = ce - ref``; 0 at ignored rows.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    valid = in_range & (tl.load(T + offs, mask=in_range, other=ignore_index) != ignore_index)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    t = tl.zeros([BLOCK], dtype=tl.float32)
    zs = tl.zeros([BLOCK], dtype=tl.float32)
    # Pairwise merge of (max, sum) pairs: m' = max(m, m_s); s' = s * exp(m - m') + s_s * exp(m_s - m')
    at = offs  # int64 offsets k * N + offs of slice k: S * N can pass 2^31
    for _ in range(0, S):
        ms = tl.load(PART_M + at, mask=valid, other=0.0)
        m_new = tl.maximum(m, ms)
        s = s * tl.exp(m - m_new) + tl.load(PART_S + at, mask=valid, other=0.0) * tl.exp(ms - m_new)
        t += tl.load(PART_T + at, mask=valid, other=0.0)
        if HAS_ZSUM:
            zs += tl.load(PART_Z + at, mask=valid, other=0.0)
        m = m_new
        at += N
    lse = tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)  # no log(0) at ignored rows
    ce = tl.where(valid, lse - t, 0.0)
    excess = ce
    if HAS_REF:
        excess = tl.where(valid, ce - tl.load(REF + offs, mask=valid, other=0.0), 0.0)
    tl.store(LSE + offs, lse, mask=in_range)
    tl.store(CE + offs, ce, mask=in_range)
    tl.store(EXCESS + offs, excess, mask=in_range)
    if HAS_ZSUM:
        tl.store(ZSUM + offs, zs, mask=in_range)


@dataclass(frozen=True)
class MergeConfig:
    block: int = 1024
    num_warps: int = 4
    num_stages: int = 1


# What the launcher uses when given no config (tests swap in smaller blocks).
DEFAULT_CONFIG = MergeConfig()


def merge_partials(
    part_m: torch.Tensor,
    part_s: torch.Tensor,
    part_t: torch.Tensor,
    targets: torch.Tensor,
    ref_loss: torch.Tensor | None,
    ignore_index: int,
    config: MergeConfig | None = None,
    part_z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``(lse, ce, excess)``, fp32 ``[N]``, 0 at ignored rows; ``ref_loss`` fp32 ``[N]`` or None.
    With ``part_z`` (the forward's partial sums of the logits) a fourth, ``sum_v z_v``."""
    cfg = config or DEFAULT_CONFIG
    splits, n = part_m.shape
    # separate tensors, not views of one: they leave a custom operator, whose outputs may not alias
    outs = [torch.empty(n, dtype=torch.float32, device=part_m.device) for _ in range(3 if part_z is None else 4)]
    lse, ce, excess = outs[:3]
    if n > 0:
        merge_kernel[(triton.cdiv(n, cfg.block),)](
            part_m, part_s, part_t, part_t if part_z is None else part_z, targets,
            lse if ref_loss is None else ref_loss, lse, ce, excess, outs[-1], n, splits, ignore_index,
            HAS_REF=ref_loss is not None, HAS_ZSUM=part_z is not None,
            BLOCK=cfg.block, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return tuple(outs)
