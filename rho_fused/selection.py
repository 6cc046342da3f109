"""Exact top-k selection by excess loss, shared by the PyTorch backends.

Within each selection group, ``n_keep = ceil(keep_ratio * n_valid)`` (at least 1 when
``n_valid >= 1``), and the kept set is the ``n_keep`` valid tokens with the largest excess,
ties going to the lower index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .global_select import global_select
from .problem import LossProblem, keep_count


def select_top(excess: Tensor, valid: Tensor, keep_ratio: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep the top ``keep_ratio`` of valid tokens by excess in each row of ``[G, M]`` inputs.

    Returns ``(kept [G, M] bool, threshold [G], n_keep [G], n_valid [G])``; ``threshold`` is the
    smallest kept excess of a group, ``+inf`` where nothing is kept.
    """
    n_valid = valid.sum(dim=1)
    n_keep = keep_count(n_valid, keep_ratio)
    if keep_ratio == 1.0:
        kept = valid.clone()
    else:
        # Two stable descending sorts make a lexicographic order: valid tokens first, by excess
        # descending, equal excess in index order. A token's rank in it decides whether it is kept.
        key = excess.masked_fill(~valid, float("-inf"))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        valid_first = torch.sort(valid.gather(1, order).to(torch.uint8), dim=1, descending=True, stable=True)
        order = order.gather(1, valid_first.indices)
        ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, ranks)
        kept = rank < n_keep[:, None]
    if kept.shape[1] == 0:
        threshold = excess.new_full((kept.shape[0],), float("inf"))
    else:
        threshold = excess.masked_fill(~kept, float("inf")).amin(dim=1)
    return kept, threshold, n_keep, n_valid


def select(p: LossProblem, excess: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 5 over the flattened tokens of ``p``: ``(kept [N], threshold [G], n_keep [G], n_valid [G])``."""
    if p.scope == "global":
        return global_select(excess, valid, p.keep_ratio, p.group)
    kept, threshold, n_keep, n_valid = select_top(excess.view(p.group_shape), valid.view(p.group_shape), p.keep_ratio)
    return kept.reshape(-1), threshold, n_keep, n_valid
