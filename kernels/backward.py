"""Backward over the kept rows only, one recompute of each logits tile.

Program ``(i, j)`` takes tile ``i`` of the compacted kept rows and vocabulary tile ``j``, recomputes
``u = h @ W.T (+ b)`` once, and forms

    dz = g_i * (softmax(z_i) - onehot(t_i)) * (1 - tanh^2(u / c) under a softcap)

with ``softmax(z_i) = exp(z_i - lse_i)`` from the forward's ``lse``. Then, for each block of D,

    dH[rows] += dz @ W[cols],    dW[cols] += dz.T @ H[rows],    db[cols] += sum_rows dz

by fp32 atomic adds: every row tile meets every vocabulary tile, so each output block has many
writers. ``dz`` enters the two gradient matmuls in the input dtype (the tensor cores' operands),
rounded once, as PyTorch's own 16-bit backward rounds it; the tile's ``g`` is first divided by its
largest ``|g_i|``, multiplied back on the fp32 products, so fp16 does not underflow.
Matmul work ``6 * n_kept * D * V`` flops. Programs past the kept count exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .forward import dot_precision
from .tile import logits_tile


@triton.jit
def backward_kernel(
    H,  # *[N, D] hidden, input dtype
    W,  # *[V, D] weight
    B,  # *[V] bias (any valid pointer when HAS_BIAS is False)
    T,  # *i64 [N] targets
    LSE,  # *f32 [N] from the forward
    G,  # *f32 upstream gradient per row: G[row * G_STRIDE]
    ROWS,  # *i32 [N] compacted kept rows; ROWS[:COUNT] are used
    COUNT,  # *i32 [1]
    DH,  # *f32 [N, D] accumulator (any valid pointer when NEED_DH is False)
    DW,  # *f32 [V, D] accumulator
    DB,  # *f32 [V] accumulator
    N,
    V,
    D,
    G_STRIDE,  # 0: one gradient for every row; 1: one per row
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Programs in flight cover GROUP_N row tiles by a run of vocabulary tiles, so the atomic adds
    # into a dH block and into a dW block are spread over several concurrent writers, not all of them.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_v = tl.cdiv(V, BLOCK_V)
    group = pid // (GROUP_N * tiles_v)
    first_n = group * GROUP_N
    group_rows = tl.minimum(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * tiles_v)) % group_rows
    pid_v = (pid % (GROUP_N * tiles_v)) // group_rows

    count = tl.load(COUNT)
    if pid_n * BLOCK_N >= count:
        return  # past the kept rows
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = pos < count
    rows = tl.load(ROWS + pos, mask=row_mask, other=0).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_mask = cols < V
    tgt = tl.load(T + rows, mask=row_mask, other=0)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows * G_STRIDE, mask=row_mask, other=0.0)

    z, t = logits_tile(
        H, W, B, rows, row_mask, cols, col_mask, D, softcap,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    # The tile's g is divided by its largest |g_i| before the 16-bit cast, and the fp32 products
    # multiplied back: fp16 has five exponent bits, and g = 1 / n_kept of a mean over many tokens
    # times a small probability would underflow to zero. (Exact powers aside, this costs one
    # rounding of g_i / g_scale in fp32, nothing in 16 bits.)
    g_scale = tl.max(tl.abs(g), axis=0)
    g_scale = tl.where(g_scale > 0.0, g_scale, 1.0)
    dz = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dz = dz * (g / g_scale)[:, None]
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if NEED_DB:
        tl.atomic_add(DB + cols, tl.sum(dz, axis=0) * g_scale, mask=col_mask, sem="relaxed")
    dz_in = dz.to(H.dtype.element_ty)  # the input dtype, so the two matmuls below use the tensor cores

    # dH[rows, d-block] += dz @ W[cols, d-block];  dW[cols, d-block] += dz.T @ H[rows, d-block]
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        if NEED_DH:
            w = tl.load(W + cols[:, None] * D + dcols[None, :], mask=col_mask[:, None] & dmask[None, :], other=0.0)
            dh = tl.dot(dz_in, w, input_precision=DOT_PRECISION) * g_scale
            tl.atomic_add(
                DH + rows[:, None] * D + dcols[None, :], dh, mask=row_mask[:, None] & dmask[None, :], sem="relaxed"
            )
        if NEED_DW:
            h = tl.load(H + rows[:, None] * D + dcols[None, :], mask=row_mask[:, None] & dmask[None, :], other=0.0)
            dw = tl.dot(tl.trans(dz_in), h, input_precision=DOT_PRECISION) * g_scale
            tl.atomic_add(
                DW + cols[:, None] * D + dcols[None, :], dw, mask=col_mask[:, None] & dmask[None, :], sem="relaxed"
            )


@dataclass(frozen=True)
class BackwardConfig:
    """Tile shape and launch options. ``block_d`` is 32: at 64 the fp32 atomic-add operands and their
    64-bit addresses (two ``[128, 64]`` tiles) push sm_80 past 255 registers into spills."""

    block_n: int = 128
    block_v: int = 128
    block_d: int = 32
    group_n: int = 8
    num_warps: int = 8
    num_stages: int = 3


def default_config(dtype: torch.dtype) -> BackwardConfig:
    """The configuration the launcher uses: 128 x 128 x 32 for 16-bit inputs; fp32 inputs (FMA dots,
    no tensor cores) spill there and take 64 x 128 x 16 with two stages."""
    if dtype == torch.float32:
        return BackwardConfig(block_n=64, block_v=128, block_d=16, num_stages=2)
    return BackwardConfig()


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    rows: torch.Tensor,
    count: torch.Tensor,
    softcap: float | None,
    needs: tuple[bool, bool, bool],
    config: BackwardConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fp32 ``(dH [N, D], dW [V, D], db [V])`` of ``sum_i g_i * ce_i`` over the kept rows ``rows[:count]``.

    ``grad`` is fp32, one element (the same ``g`` for every row) or ``[N]`` (``g_i`` per row).
    Gradients not asked for in ``needs`` come back as None and cost nothing.
    """
    cfg = config or default_config(hidden.dtype)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    need_dh, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    dh = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros(v, d, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    if n > 0 and (need_dh or need_dw or need_db):
        dummy = lse
        grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
        backward_kernel[grid](
            hidden, weight, weight if bias is None else bias, targets, lse, grad, rows, count,
            dummy if dh is None else dh, dummy if dw is None else dw, dummy if db is None else db,
            n, v, d, 0 if grad.numel() == 1 else 1, 1.0 if softcap is None else softcap,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            DOT_PRECISION=dot_precision(hidden.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dh, dw, db
