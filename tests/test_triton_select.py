"""The radix-select and compaction kernels on hand-made inputs: exact ties, -inf, -0.0, ignored rows.

Oracle: `rho_fused.selection.select_top` (two stable sorts). The masks must be identical, not close.
Blocks of 16 make every group span several blocks, so ranks among equal keys carry across blocks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE
from rho_fused.kernels.compact import CompactConfig, compact_mask
from rho_fused.kernels.select import SelectConfig, radix_top_k

from rho_fused.problem import keep_fraction
from rho_fused.selection import select_top

IGNORE = -100
INF = float("inf")
SMALL = SelectConfig(block=16)


def check(excess: torch.Tensor, valid: torch.Tensor, groups: int, keep_ratio: float) -> torch.Tensor:
    """Kernel against the oracle on ``excess`` [N] (fp32) with ``valid`` [N]; returns the kept mask."""
    targets = torch.where(valid, 3, IGNORE).to(torch.int64)
    out = radix_top_k(
        excess.float().contiguous().to(KERNEL_DEVICE), targets.to(KERNEL_DEVICE), groups, IGNORE,
        keep_fraction(keep_ratio), SMALL,
    )  # fmt: skip
    kept, threshold, n_keep, n_valid = (t.cpu() for t in out)
    kept_ref, threshold_ref, n_keep_ref, n_valid_ref = select_top(
        excess.float().view(groups, -1), valid.view(groups, -1), keep_ratio
    )
    assert torch.equal(n_valid.long(), n_valid_ref), (n_valid, n_valid_ref)
    assert torch.equal(n_keep.long(), n_keep_ref), (n_keep, n_keep_ref)
    assert torch.equal(kept, kept_ref.reshape(-1)), (kept.view(groups, -1), kept_ref)
    assert torch.equal(threshold, threshold_ref), (threshold, threshold_ref)
    return kept


@pytest.mark.parametrize("keep_ratio", [0.6, 0.5, 0.25, 0.01, 1.0])
def test_integer_ties_across_blocks(keep_ratio):
    g = torch.Generator().manual_seed(1)
    excess = torch.randint(-2, 3, (70,), generator=g).float()  # five values, fourteen copies each
    valid = torch.rand(70, generator=g) > 0.2
    kept = check(excess, valid, 1, keep_ratio)
    p, q = keep_fraction(keep_ratio)
    assert int(kept.sum()) == max(1, -(-int(valid.sum()) * p // q))  # ceil in integers


def test_neg_inf_and_ties_to_lower_index():
    excess = torch.tensor([1.0, -INF, 1.0, -INF, 2.0, 1.0, -INF, -INF, 0.0, -INF, -INF, 1.0] * 4)
    valid = torch.ones_like(excess, dtype=torch.bool)
    valid[[0, 13, 30]] = False
    for keep_ratio in (0.1, 0.3, 0.5, 0.75, 0.9, 1.0):
        check(excess, valid, 1, keep_ratio)
    # -inf values are valid and can be kept: with keep 0.9 the cut falls inside the -inf level
    kept = check(excess, valid, 1, 0.9)
    assert (kept & (excess == -INF)).any() and (~kept & valid & (excess == -INF)).any()


def test_all_neg_inf_and_single_valid():
    excess = torch.full((33,), -INF)
    check(excess, torch.ones(33, dtype=torch.bool), 1, 0.5)
    valid = torch.zeros(33, dtype=torch.bool)
    valid[17] = True
    kept = check(torch.randn(33), valid, 1, 0.01)
    assert kept.nonzero().flatten().tolist() == [17]


def test_signed_zero_ties_positive_zero():
    """-0.0 == 0.0, so they tie and the lower index wins whichever sign it carries."""
    excess = torch.tensor([0.0, -0.0, 0.0, -0.0, -1.0, 1.0, -0.0, 0.0] * 3)
    valid = torch.ones_like(excess, dtype=torch.bool)
    for keep_ratio in (0.2, 0.4, 0.6):
        check(excess, valid, 1, keep_ratio)


def test_extremes_and_denormals():
    tiny = torch.finfo(torch.float32).tiny
    big = torch.finfo(torch.float32).max
    values = [big, -big, INF, -INF, tiny, -tiny, tiny / 4, -tiny / 4, 0.0, 1.0, -1.0, 1.0 + 2**-23, 1.0 - 2**-24]
    excess = torch.tensor(values * 3)
    valid = torch.ones_like(excess, dtype=torch.bool)
    for keep_ratio in (0.05, 0.3, 0.5, 0.77, 1.0):
        check(excess, valid, 1, keep_ratio)


@pytest.mark.parametrize("keep_ratio", [0.7, 0.34])
def test_groups_with_an_empty_group(keep_ratio):
    g = torch.Generator().manual_seed(2)
    excess = torch.randint(-3, 3, (4, 19), generator=g).float()
    excess[0, ::3] = -INF
    valid = torch.rand(4, 19, generator=g) > 0.3
    valid[2] = False  # nothing to keep in group 2: threshold +inf
    check(excess.reshape(-1), valid.reshape(-1), 4, keep_ratio)


def test_exact_fraction():
    """0.7 of 10 valid tokens keeps exactly 7 (a float ceil would give 8 for 0.7 * 10 = 7.000000000000001)."""
    excess = torch.arange(10.0)
    kept = check(excess, torch.ones(10, dtype=torch.bool), 1, 0.7)
    assert int(kept.sum()) == 7 and kept[3:].all()


@pytest.mark.parametrize("n,block", [(0, 16), (1, 16), (37, 16), (64, 16), (70, 32)])
def test_compact(n, block):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) > 0.4
    idx, count = (t.cpu() for t in compact_mask(mask.to(KERNEL_DEVICE), CompactConfig(block=block)))
    expected = mask.nonzero().flatten()
    assert count.tolist() == [expected.numel()]
    assert torch.equal(idx[: expected.numel()].long(), expected)


def test_random_small_alphabets():
    """Forty random cases: sizes, group counts, keep ratios, few distinct values (ties everywhere),
    -inf and ignored rows sprinkled in."""
    g = torch.Generator().manual_seed(7)
    values = torch.tensor([-INF, -2.5, -0.0, 0.0, 1.0, 1.0 + 2**-20, 3.0, 1e30])
    for _ in range(40):
        groups = int(torch.randint(1, 4, (), generator=g))
        m = int(torch.randint(1, 40, (), generator=g))
        excess = values[torch.randint(0, len(values), (groups * m,), generator=g)]
        valid = torch.rand(groups * m, generator=g) > float(torch.rand((), generator=g)) * 0.6
        keep_ratio = float(torch.randint(1, 101, (), generator=g)) / 100
        check(excess, valid, groups, keep_ratio)


def test_nan_ranks_highest_whatever_its_sign():
    """Every NaN gets one key, the highest, as torch's sort orders NaN above +inf: a NaN with its
    sign bit set must not rank below -inf, and NaNs of either sign tie (lower index first)."""
    neg_nan = torch.tensor([0xFFC00000], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]
    pos_nan = torch.tensor(float("nan"))
    assert torch.signbit(neg_nan) and not torch.signbit(pos_nan)
    excess = torch.tensor([1.0, 0.0, INF, -INF, 2.0, -1.0, 3.0, 0.5] * 2)
    excess[[1, 9]] = neg_nan
    excess[[5, 12]] = pos_nan
    valid = torch.ones_like(excess, dtype=torch.bool)
    valid[12] = False
    targets = torch.where(valid, 3, IGNORE).to(torch.int64)
    for keep_ratio in (0.1, 0.2, 0.4, 0.9):
        kept, threshold, n_keep, _ = radix_top_k(excess, targets, 1, IGNORE, keep_fraction(keep_ratio), SMALL)
        kept_ref, threshold_ref, n_keep_ref, _ = select_top(excess.view(1, -1), valid.view(1, -1), keep_ratio)
        assert torch.equal(n_keep.long(), n_keep_ref)
        assert torch.equal(kept, kept_ref.reshape(-1)), (keep_ratio, kept, kept_ref)
        # the three valid NaNs come first, in index order
        assert kept[[1, 5, 9]].sum() == min(3, int(n_keep))
        if int(n_keep) <= 3:
            assert torch.isnan(threshold).all() and torch.isnan(threshold_ref).all()
