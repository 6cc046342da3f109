"""Exact n_keep and top-k selection against a plain-Python oracle."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from rho_fused.problem import keep_count
from rho_fused.selection import select_top


def oracle(excess: list[float], valid: list[bool], keep_ratio: float) -> list[bool]:
    """The contract in words: the ceil(r * n_valid) valid tokens of largest excess, ties to the lower index."""
    candidates = [i for i, v in enumerate(valid) if v]
    n_keep = math.ceil(Fraction(str(keep_ratio)) * len(candidates))
    n_keep = max(n_keep, 1) if candidates else 0
    ranked = sorted(candidates, key=lambda i: (-excess[i], i))
    kept = set(ranked[:n_keep])
    return [i in kept for i in range(len(excess))]


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.3, 0.6, 0.7, 0.9, 0.95, 0.99, 1.0])
def test_keep_count_is_exact_ceil(ratio):
    n = torch.arange(0, 2001)
    expected = [max(1, math.ceil(Fraction(str(ratio)) * k)) if k else 0 for k in range(2001)]
    assert keep_count(n, ratio).tolist() == expected


@pytest.mark.parametrize("seed", range(12))
def test_select_top_matches_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    groups, m = 3, 41
    # Few distinct values: many exact ties, plus -inf and +inf excess at valid positions.
    excess = torch.randint(-3, 4, (groups, m), generator=g).float()
    excess[torch.rand(groups, m, generator=g) < 0.1] = float("-inf")
    excess[torch.rand(groups, m, generator=g) < 0.05] = float("inf")
    valid = torch.rand(groups, m, generator=g) > 0.3
    valid[0] = False  # a group with nothing to keep
    ratio = [0.6, 0.7, 0.2, 1.0, 0.01, 0.5][seed % 6]
    kept, threshold, n_keep, n_valid = select_top(excess, valid, ratio)
    for row in range(groups):
        expected = oracle(excess[row].tolist(), valid[row].tolist(), ratio)
        assert kept[row].tolist() == expected
        assert n_keep[row].item() == sum(expected) and n_valid[row].item() == valid[row].sum().item()
        kept_values = excess[row][kept[row]]
        assert threshold[row].item() == (kept_values.min().item() if len(kept_values) else float("inf"))
