"""Exact top-k selection by excess loss: a radix select over order-preserving integer keys.

Within each selection group (rows ``g * M .. (g + 1) * M``) the kept set is the ``n_keep`` valid
rows of largest excess, ties to the lower index, with ``n_keep = ceil(p * n_valid / q)`` (at
least 1 when ``n_valid >= 1``) in integers, for ``keep_ratio = p / q``.

Each fp32 excess maps to a uint32 key whose unsigned order is the float order (-inf included;
every NaN on one key above +inf, as torch's sort orders NaN).
Four passes of 8-bit histograms, most significant digit first, narrow down the exact key of the
``n_keep``-th largest value; a last pass keeps every larger key and the first ``r`` equal ones in
index order, ``r`` being what is left of ``n_keep`` after the larger keys. The histograms are
plain counts, so a multi-rank selection can sum them across ranks and select exactly over all
ranks without gathering the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _ordered_key(x):
    """uint32 key, increasing with the float: flip every bit of negatives, the sign bit of the rest.

    ``-0.0`` is read as ``+0.0`` so that equal floats get equal keys. Every NaN, whatever its sign
    and payload, is read as ``0x7FFFFFFF``, whose key ``0xFFFFFFFF`` is the highest: NaN ranks above
    ``+inf``, as in torch's sort, and all NaNs tie (a NaN with its sign bit set would otherwise rank
    below ``-inf``).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits).to(tl.uint32)
    bits = tl.where(x != x, 0x7FFFFFFF, bits).to(tl.uint32)
    flip = tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


@triton.jit
def _key_to_float(key):
    """Inverse of `_ordered_key`."""
    flip = tl.where((key >> 31) != 0, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    return (key ^ flip).to(tl.float32, bitcast=True)


@triton.jit
def _load_keys(EXCESS, T, base, offs, M, ignore_index):
    """Keys and validity of rows ``base + offs`` of a group of ``M`` rows."""
    in_group = offs < M
    tgt = tl.load(T + base + offs, mask=in_group, other=ignore_index)
    x = tl.load(EXCESS + base + offs, mask=in_group, other=0.0)
    return _ordered_key(x), in_group & (tgt != ignore_index)


@triton.jit
def _digit_histogram(EXCESS, T, base, M, ignore_index, prefix, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Counts of digit ``(key >> SHIFT) & 255`` over valid rows whose key agrees with ``prefix``
    on every bit above ``SHIFT + 8``."""
    hist = tl.zeros([256], dtype=tl.int32)
    n_invalid = tl.zeros([], dtype=tl.int32)
    for start in range(0, M, BLOCK):
        key, valid = _load_keys(EXCESS, T, base, start + tl.arange(0, BLOCK), M, ignore_index)
        if SHIFT < 24:
            valid = valid & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        digit = tl.where(valid, ((key >> SHIFT) & 255).to(tl.int32), 0)
        hist += tl.histogram(digit, 256)
        n_invalid += BLOCK - tl.sum(valid.to(tl.int32), axis=0)
    # No `mask=` before Triton 3.4: hist(where(valid, d, 0)) = hist_valid(d) + n_invalid * [bin == 0].
    return hist - tl.where(tl.arange(0, 256) == 0, n_invalid, 0)


@triton.jit
def _narrow(hist, prefix, k_rem, SHIFT: tl.constexpr):
    """Pick the digit holding the ``k_rem``-th largest key among those counted in ``hist``.

    ``above[b] = sum_{j > b} hist[j]``; the digit is the largest ``b`` with ``above[b] + hist[b] >= k_rem``,
    and ``k_rem`` drops by ``above[b]``, the keys known to be larger.
    """
    at_or_above = tl.cumsum(hist, axis=0, reverse=True)
    digit = tl.sum((at_or_above >= k_rem).to(tl.int32), axis=0) - 1
    digit = tl.maximum(digit, 0)  # k_rem == 0 (nothing to keep): any digit, nothing is kept below
    bins = tl.arange(0, 256)
    above = tl.sum(tl.where(bins == digit, at_or_above - hist, 0), axis=0)
    return prefix | (digit.to(tl.uint32) << SHIFT), k_rem - above


@triton.jit
def select_kernel(
    EXCESS,  # *f32 [G * M]
    T,  # *i64 [G * M] targets
    KEPT,  # *u8 [G * M] out
    THRESHOLD,  # *f32 [G] out: smallest kept excess, +inf when nothing is kept
    N_KEEP,  # *i32 [G] out
    N_VALID,  # *i32 [G] out
    M,
    ignore_index,
    keep_p,  # keep_ratio = keep_p / keep_q exactly
    keep_q,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    base = g.to(tl.int64) * M
    prefix = tl.zeros([], dtype=tl.uint32)

    # Pass 1 also counts the valid rows: n_keep = ceil(p * n_valid / q) = (p * n_valid + q - 1) // q, in int64.
    hist = _digit_histogram(EXCESS, T, base, M, ignore_index, prefix, 24, BLOCK)
    n_valid = tl.sum(hist, axis=0)
    n_keep = (n_valid.to(tl.int64) * keep_p + keep_q - 1) // keep_q
    n_keep = tl.where(n_valid > 0, tl.maximum(n_keep, 1), 0).to(tl.int32)
    prefix, k_rem = _narrow(hist, prefix, n_keep, 24)
    for p in tl.static_range(1, 4):
        hist = _digit_histogram(EXCESS, T, base, M, ignore_index, prefix, 24 - 8 * p, BLOCK)
        prefix, k_rem = _narrow(hist, prefix, k_rem, 24 - 8 * p)

    # prefix is now the key of the n_keep-th largest excess; k_rem of the rows holding exactly it
    # are kept, the first in index order:  kept_i = key_i > prefix  or  (key_i == prefix and
    # #{j < i : key_j == prefix} < k_rem).
    equal_before = tl.zeros([], dtype=tl.int32)
    for start in range(0, M, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key, valid = _load_keys(EXCESS, T, base, offs, M, ignore_index)
        eq = (valid & (key == prefix)).to(tl.int32)
        rank = equal_before + tl.cumsum(eq, axis=0) - eq
        kept = (valid & (key > prefix)) | ((eq != 0) & (rank < k_rem))
        kept = kept & (n_keep > 0)
        tl.store(KEPT + base + offs, kept.to(tl.uint8), mask=offs < M)
        equal_before += tl.sum(eq, axis=0)

    tl.store(THRESHOLD + g, tl.where(n_keep > 0, _key_to_float(prefix), float("inf")))
    tl.store(N_KEEP + g, n_keep)
    tl.store(N_VALID + g, n_valid)


@dataclass(frozen=True)
class SelectConfig:
    block: int = 1024
    # 8 warps: spill-free on sm_80 and sm_90 with every Triton from 3.2 to 3.9 (compiled offline);
    # at 4, ptxas spilled 8 to 40 bytes on sm_90 with some of them (the `mask=` kernel too, on 3.5.1).
    num_warps: int = 8
    num_stages: int = 1


# What the launcher uses when given no config (tests swap in smaller blocks).
DEFAULT_CONFIG = SelectConfig()


def radix_top_k(
    excess: torch.Tensor,
    targets: torch.Tensor,
    groups: int,
    ignore_index: int,
    keep: tuple[int, int],
    config: SelectConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kept bool [N], threshold f32 [G], n_keep i32 [G], n_valid i32 [G])`` over ``G`` equal groups.

    ``excess`` fp32 ``[N]``, ``targets`` int64 ``[N]``, ``keep = (p, q)`` the exact keep fraction.
    One program per group; no host synchronisation.
    """
    cfg = config or DEFAULT_CONFIG
    n = excess.shape[0]
    dev = excess.device
    kept = torch.empty(n, dtype=torch.bool, device=dev)
    threshold = torch.empty(groups, dtype=torch.float32, device=dev)
    n_keep = torch.empty(groups, dtype=torch.int32, device=dev)
    n_valid = torch.empty(groups, dtype=torch.int32, device=dev)
    m = n // groups if groups else 0
    if m == 0:
        threshold.fill_(float("inf"))
        n_keep.zero_()
        n_valid.zero_()
        return kept, threshold, n_keep, n_valid
    select_kernel[(groups,)](
        excess, targets, kept.view(torch.uint8), threshold, n_keep, n_valid, m, ignore_index, keep[0], keep[1],
        BLOCK=cfg.block, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return kept, threshold, n_keep, n_valid
