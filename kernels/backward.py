"""Backward over the kept rows only: one Triton kernel writes ``dz``, cuBLAS does the two gradient matmuls.

Let ``K`` be the compacted kept rows (``rows[:count]``, from `rho_fused.kernels.compact.compact_mask`)
and ``C >= count`` their *capacity*, a bound the host knows from shapes and the keep ratio alone
(the launcher's ``capacity``). The vocabulary is walked in chunks ``[v0, v0 + Vc)``; for each chunk

1. `dz_kernel` recomputes ``u = H[K] @ W[v0:v0+Vc].T (+ b)`` once, tile by tile on the tensor cores,
   and writes, for position ``k < C`` of the kept list and column ``v`` of the chunk,

       dz[k, v] = g_k / s * (softmax(z_k)[v] - onehot(t_k)[v]) * (1 - tanh^2(u / c) under a softcap)

   or, with a per-row softmax coefficient ``a_k`` (``HAS_A``: z-loss, a gradient of the returned
   logsumexp) and label smoothing ``eps`` (``HAS_SMOOTH``),

       dz[k, v] = (a_k softmax(z_k)[v] - g_k ((1 - eps) onehot(t_k)[v] + eps / V)) / s  (* 1 - tanh^2)

   with ``softmax(z_k) = exp(z_k - lse_k)`` from the forward's ``lse``, into a ``[C, Vc]`` buffer in
   the input dtype (bf16 / fp16 / fp32). Positions ``k >= count`` get zero rows, without a recompute.
2. cuBLAS (torch matmuls, fp32 accumulation inside):

       dH_acc[C, D]     += dz @ W[v0:v0+Vc]          (fp32 product, fp32 accumulator across chunks)
       dW[v0:v0+Vc, :]   = s * (dz.T @ H[K])          (each chunk of d weight written once)
       db[v0:v0+Vc]      = s * sum_k dz[k, :]     (from per-row-tile fp32 column sums the kernel writes)

   and after the last chunk ``dH[K] = s * dH_acc``, scattered to the kept rows (every other row 0).

Every output element is written by one deterministic operation (no atomics): gradients are
bit-identical from run to run, and ``torch.use_deterministic_algorithms`` governs the torch ops.
Matmul work ``6 * C * D * V`` flops: the recompute skips positions past ``count``, the two cuBLAS
matmuls do not (they are sized on the host): ``4 * (C - count) * D * V`` flops spent on zero rows.

Why chunks of the vocabulary, not of rows: the output accumulated across chunks needs fp32, and
``dH`` of the kept rows is ``C x D x 4`` bytes (80 MB at C=4916, D=4096) where an fp32 ``dW``
would be ``V x D x 4`` (2.1 GB at V=128256). ``Vc`` comes from a memory budget
(`BackwardConfig.budget_bytes`, 512 MiB) for the ``[C, Vc]`` buffer (and, for fp16, the
``[Vc, D]`` fp32 product), a multiple of the tile width; no constant chunk size. Memory beyond the
gradients themselves: that budget, ``H[K]`` (``C x D`` in the input dtype), ``dH_acc`` and each
chunk's fp32 product ``dz @ W[chunk]`` (``C x D x 4`` each), and ``[C / BLOCK_N, Vc]`` fp32 column
sums for d bias. At N=8192, keep 0.6, D=4096, V=128256, bf16: ``Vc = 54528`` (3 chunks), about
0.7 GB in all, against 2.1 GB for the fp32 ``dW`` alone before.

The capacity and the zero rows (no host synchronisation, by choice): the launches must not read
``count`` on the host (CUDA graphs; `tests/test_triton_parity.py::test_no_host_sync`), so the
cuBLAS shapes use ``C``. The caller sets ``C`` to the largest count the selection can produce:
``sum over groups of max(1, ceil(keep_ratio * M))`` for per-call or per-sequence selection, which
is the exact count when every token is valid; the waste is then the ignored tokens' share,
``keep_ratio * n_ignored`` rows. With ``scope="global"`` a rank may keep all its rows, so ``C = N``
and the waste is the rows this rank did not keep: up to ``(1 - r) / r`` of the backward matmuls.

The scale ``s``: a power of two near ``max_k |g_k|`` for fp16 (five exponent bits: ``g = 1e-5``
times a small probability underflows), applied to the fp32 products, exactly; 1 for bf16 and
fp32 (bf16 has fp32's exponent range), so their ``dW`` chunk goes straight from cuBLAS to the
weight dtype, rounded once, as PyTorch's own 16-bit backward rounds it.

fp32 inputs: the recompute takes full-precision ("ieee") dots, not TF32; the cuBLAS matmuls follow
torch's own setting (``torch.backends.cuda.matmul.allow_tf32``, False by default: full fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .forward import dot_precision
from .plan import backward_plan
from .tile import logits_tile


@triton.jit
def dz_kernel(
    H,  # *[N, D] hidden, input dtype
    W,  # *[V, D] weight
    B,  # *[V] bias (any valid pointer when HAS_BIAS is False)
    T,  # *i64 [N] targets
    LSE,  # *f32 [N] from the forward
    G,  # *f32 upstream gradient per row: G[row * G_STRIDE]
    A,  # *f32 [N] softmax coefficient per row (HAS_A; else a = g)
    INV_SCALE,  # *f32 [1]: 1 / s
    ROWS,  # *i32 [>= C] compacted kept rows; ROWS[:COUNT] are used
    COUNT,  # *i32 [1]
    DZ,  # *[C, n_cols] out, input dtype
    DB_PART,  # *f32 [cdiv(C, BLOCK_N), n_cols] out: column sums of this row tile's fp32 dz (NEED_DB)
    V,
    D,
    C,  # capacity: rows of DZ
    v0,  # first vocabulary entry of the chunk
    n_cols,  # columns of the chunk (and row stride of DZ)
    G_STRIDE,  # 0: one gradient for every row; 1: one per row
    softcap,
    smoothing,  # label smoothing eps (HAS_SMOOTH)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped order: consecutive programs cover GROUP_N row tiles by a run of vocabulary tiles, so
    # the programs in flight share GROUP_N tiles of H[K] and each tile of W is read from HBM once per
    # GROUP_N row tiles, not once per row tile.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(C, BLOCK_N)
    tiles_v = tl.cdiv(n_cols, BLOCK_V)
    group = pid // (GROUP_N * tiles_v)
    first_n = group * GROUP_N
    group_rows = tl.minimum(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * tiles_v)) % group_rows
    pid_v = (pid % (GROUP_N * tiles_v)) // group_rows
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    out_mask = (pos < C)[:, None] & (local < n_cols)[None, :]
    out = DZ + pos.to(tl.int64)[:, None] * n_cols + local[None, :]
    part = DB_PART + pid_n.to(tl.int64) * n_cols + local
    count = tl.load(COUNT)
    if pid_n * BLOCK_N >= count:
        # past the kept rows: zero rows, so the cuBLAS matmuls over the capacity add nothing
        tl.store(out, tl.zeros([BLOCK_N, BLOCK_V], dtype=DZ.dtype.element_ty), mask=out_mask)
        if NEED_DB:
            tl.store(part, tl.zeros([BLOCK_V], dtype=tl.float32), mask=local < n_cols)
        return
    row_mask = pos < count
    rows = tl.load(ROWS + pos, mask=row_mask, other=0).to(tl.int64)
    cols = v0 + local.to(tl.int64)
    col_mask = (local < n_cols) & (cols < V)
    tgt = tl.load(T + rows, mask=row_mask, other=0)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    inv_scale = tl.load(INV_SCALE)
    g = tl.load(G + rows * G_STRIDE, mask=row_mask, other=0.0) * inv_scale

    z, t = logits_tile(
        H, W, B, rows, row_mask, cols, col_mask, D, softcap,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    # dz = g / s * (exp(z - lse) - onehot(t)) (* (1 - tanh^2) under a softcap), 0 outside the kept rows
    if HAS_A or HAS_SMOOTH:
        # dz = (a exp(z - lse) - g ((1 - eps) onehot(t) + eps / V)) / s
        a = g
        if HAS_A:
            a = tl.load(A + rows, mask=row_mask, other=0.0) * inv_scale
        hot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        if HAS_SMOOTH:
            hot = hot * (1.0 - smoothing) + smoothing / V
        dz = tl.exp(z - lse[:, None]) * a[:, None] - hot * g[:, None]
    else:
        dz = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dz = dz * g[:, None]
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if NEED_DB:  # d bias from the fp32 dz, before its rounding to the input dtype
        tl.store(part, tl.sum(dz, axis=0), mask=local < n_cols)
    tl.store(out, dz.to(DZ.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class BackwardConfig:
    """Tile shape and launch options of `dz_kernel`, and the memory budget of one vocabulary chunk.

    ``budget_bytes`` bounds the ``[C, Vc]`` dz buffer (plus, for fp16, the ``[Vc, D]`` fp32 d weight
    product); ``Vc`` is the largest multiple of ``block_v`` that fits, at least ``block_v``
    (`rho_fused.kernels.plan.backward_plan`).
    """

    block_n: int = 128
    block_v: int = 128
    block_d: int = 64
    group_n: int = 16  # with 4 stages: 0.89x the time of (8, 3) on an H200, bf16 (bench/NOTES.md)
    num_warps: int = 8
    num_stages: int = 4
    budget_bytes: int = 512 * 2**20


def default_config(dtype: torch.dtype) -> BackwardConfig:
    """The configuration the launcher uses: 128 x 128 x 64 tiles for 16-bit inputs (tensor cores, as
    the forward); fp32 inputs (full-precision FMA dots) take 64 x 128 x 16, two stages."""
    if dtype == torch.float32:
        return BackwardConfig(block_n=64, block_v=128, block_d=16, group_n=8, num_stages=2)
    return BackwardConfig()


def _scale(
    g: torch.Tensor, rows: torch.Tensor, live: torch.Tensor, dtype: torch.dtype, a: torch.Tensor | None = None
) -> torch.Tensor:
    """``s``, fp32 ``[1]`` on the device: ``2^floor(log2 max |g_k|, |a_k|)`` over the kept rows for fp16, else 1."""
    if dtype != torch.float16:
        return torch.ones(1, dtype=torch.float32, device=g.device)
    gk = g.abs() if g.numel() == 1 else torch.where(live, g.index_select(0, rows).abs(), 0.0)
    top = gk.amax().reshape(1)
    if a is not None:
        top = torch.maximum(top, torch.where(live, a.index_select(0, rows).abs(), 0.0).amax().reshape(1))
    # a power of two: multiplying by it (or dividing) is exact; s = 1 when every g is 0
    return torch.where(top > 0, torch.exp2(torch.floor(torch.log2(top))), 1.0)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 from operands in the input dtype.

    CUDA, 16-bit: one cuBLAS call on the tensor cores, fp32 accumulation and fp32 output
    (``torch.mm(..., out_dtype=torch.float32)``, torch >= 2.8; before that the product comes back
    rounded to 16 bits once). Elsewhere (the interpreter's CPU tests) the product of fp32 copies:
    the same numbers, since a product of two 16-bit values is exact in fp32.
    """
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # torch < 2.8: no fp32 output from 16-bit operands
            return torch.mm(a, b).float()
    return a.float() @ b.float()


def kept_rows_backward(
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
    capacity: int | None = None,
    config: BackwardConfig | None = None,
    softmax_coef: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dH [N, D], dW [V, D], db [V])`` of ``sum_i g_i * ce_i`` over the kept rows ``rows[:count]``,
    in the dtypes of ``hidden``, ``weight`` and ``bias``. With ``softmax_coef`` (fp32 ``[N]``, ``a_i``)
    and ``label_smoothing`` (``eps``) the rows' ``dz`` is ``a_i softmax - g_i ((1 - eps) onehot + eps / V)``.

    ``grad`` is fp32, one element (the same ``g`` for every row) or ``[N]`` (``g_i`` per row).
    ``capacity``: an upper bound of ``count`` known on the host (default ``N``); the cuBLAS matmuls
    are sized by it (see the module docstring). If ``count`` exceeded it, rows past it would get no
    gradient. Gradients not asked for in ``needs`` come back as None and cost nothing.
    """
    cfg = config or default_config(hidden.dtype)
    n, d = hidden.shape
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    cap = n if capacity is None else max(0, min(capacity, n))
    need_dh, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    if not (need_dh or need_dw or need_db):
        return None, None, None
    if cap == 0:
        return (
            torch.zeros_like(hidden) if need_dh else None,
            torch.zeros_like(weight) if need_dw else None,
            torch.zeros_like(bias) if need_db else None,
        )
    # Positions past the count point at row 0 for the gathers (their dz rows are 0) and at a
    # spare row n for the final scatter of d hidden.
    pos = torch.arange(cap, device=dev)
    live = pos < count.to(torch.int64)
    kept = rows[:cap].to(torch.int64)
    gather_rows = torch.where(live, kept, 0)
    s = _scale(grad, gather_rows, live, dtype, softmax_coef)
    inv_s = 1.0 / s

    hk = None
    if need_dw:  # H[K], rows past the count zeroed (0 * a non-finite hidden value would be NaN)
        hk = hidden.index_select(0, gather_rows).masked_fill_(~live[:, None], 0)
    dh_acc = torch.zeros(cap, d, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(v, dtype=torch.float32, device=dev) if need_db else None

    plan = backward_plan(cap, v, d, dtype, cfg)
    vc, tiles_n = plan.chunk_columns, plan.row_tiles
    buf = torch.empty(cap * min(vc, v), dtype=dtype, device=dev)
    part_buf = torch.empty(tiles_n * min(vc, v) if need_db else 1, dtype=torch.float32, device=dev)
    for v0 in range(0, v, vc):
        w = min(vc, v - v0)
        dz = buf[: cap * w].view(cap, w)
        part = part_buf[: tiles_n * w].view(tiles_n, w) if need_db else part_buf
        grid = (triton.cdiv(w, cfg.block_v) * tiles_n,)
        dz_kernel[grid](
            hidden, weight, weight if bias is None else bias, targets, lse, grad,
            grad if softmax_coef is None else softmax_coef, inv_s, rows, count, dz, part,
            v, d, cap, v0, w, 0 if grad.numel() == 1 else 1, 1.0 if softcap is None else softcap,
            float(label_smoothing), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_A=softmax_coef is not None, HAS_SMOOTH=label_smoothing != 0, NEED_DB=need_db,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            DOT_PRECISION=dot_precision(dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if need_dh:  # dH_acc += dz @ W[chunk], fp32 across chunks
            dh_acc += _mm_fp32(dz, weight[v0 : v0 + w])
        if need_dw:  # dW[chunk] = s * dz.T @ H[K], written once
            if dtype == torch.float16:
                dw[v0 : v0 + w].copy_(_mm_fp32(dz.T, hk).mul_(s))
            else:
                torch.mm(dz.T, hk, out=dw[v0 : v0 + w])
        if need_db:
            torch.sum(part, 0, out=db[v0 : v0 + w])

    dh = None
    if need_dh:
        full = torch.zeros(n + 1, d, dtype=dtype, device=dev)
        full.index_copy_(0, torch.where(live, kept, n), dh_acc.mul_(s).to(dtype))
        dh = full[:n]
    if need_db:
        db = db.mul_(s).to(bias.dtype)
    return dh, dw, db
