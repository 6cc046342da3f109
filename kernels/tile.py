"""Device helpers shared by the forward and backward kernels (no kernel lives here).

The backward recomputes the logits with the very code the forward ran, so both see the same
``z`` up to the matmul's summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logits_tile(
    H,
    W,
    B,
    rows,  # int64 [BLOCK_N]: token rows of this tile
    row_mask,
    cols,  # int64 [BLOCK_V]: vocabulary entries of this tile
    col_mask,
    D,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``(z, t)`` for one ``[BLOCK_N, BLOCK_V]`` tile, fp32.

    ``u = H[rows] @ W[cols].T (+ B[cols])``; without a softcap ``z = u`` and ``t = u``; with one,
    ``t = tanh(u / c)`` and ``z = c * t`` (the backward needs ``t`` for ``dz/du = 1 - t^2``).
    Operands stay in the input dtype so the tensor cores take them; the sum is fp32.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    # u[n, v] = sum_d H[n, d] * W[v, d], BLOCK_D columns of D at a time
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        h = tl.load(H + rows[:, None] * D + dcols[None, :], mask=row_mask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * D + dcols[None, :], mask=col_mask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 when exp over/underflows
        t = 1.0 - 2.0 / (tl.exp(acc * (2.0 / softcap)) + 1.0)
        return softcap * t, t
    else:
        return acc, acc
