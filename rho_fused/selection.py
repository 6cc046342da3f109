"""Step 5 of the contract for the fused backends: which tokens are kept, and with what weight.

Top-k: within each selection group, ``n_keep = ceil(keep_ratio * n_valid)`` (at least 1 when
``n_valid >= 1``), and the kept set is the ``n_keep`` valid tokens with the largest excess,
ties going to the lower index (`select_top`; the triton backend brings its own kernel). The other
rules (threshold, sampling, soft weights) are elementwise torch ops around that top-k, on the
device, reading nothing back to the host (`choose`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .global_select import global_select
from .problem import LossProblem, keep_count

# top_k(score [N], valid [N]) -> (kept [N], threshold [G], n_keep [G], n_valid [G]) per selection group
TopK = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


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


def sampling_keys(excess: Tensor, uniform: Tensor) -> Tensor:
    """Gumbel top-k keys of ``selection="sample"``: ``log(max(excess, 0) + 1e-6) - log(-log(U))``."""
    return torch.log(excess.clamp(min=0) + 1e-6) - torch.log(-torch.log(uniform.to(excess.dtype)))


def _over_ranks(p: LossProblem, value: Tensor) -> Tensor:
    """``value`` summed over the ranks of ``p.group`` (one all_reduce, no host read)."""
    value = value.clone()
    dist.all_reduce(value, group=p.group)
    return value


def choose(p: LossProblem, excess: Tensor, valid: Tensor, top_k: TopK) -> tuple[Tensor, ...]:
    """Step 5 by ``p``'s rule: ``(kept [N], threshold [G], n_kept [G], n_valid [G], weight [N], weight_sum [G])``.

    ``weight`` is each token's ``W_i`` (0 where not kept) and ``weight_sum`` its sum per group, the
    denominator of ``mean``; with ``scope="global"`` the per-group values are over all ranks.
    ``top_k`` ranks a score within the groups of one call (``scope="global"`` uses `global_select`).
    """
    rows = p.group_shape
    if p.weighting == "soft" or p.selection == "threshold":
        kept = valid.clone() if p.weighting == "soft" else valid & (excess > p.threshold)
        n_kept, n_valid = kept.view(rows).sum(dim=1), valid.view(rows).sum(dim=1)
        if p.scope == "global":
            n_kept, n_valid = _over_ranks(p, n_kept), _over_ranks(p, n_valid)
        threshold = torch.full((p.groups,), p.threshold, dtype=excess.dtype, device=excess.device)
    else:
        score = sampling_keys(excess, p.uniform) if p.selection == "sample" else excess
        if p.scope == "global":
            kept, threshold, n_kept, n_valid = global_select(score, valid, p.keep_ratio, p.group)
        else:
            kept, threshold, n_kept, n_valid = top_k(score, valid)
    n_kept, n_valid = n_kept.long(), n_valid.long()
    if not p.weighted:
        return kept, threshold, n_kept, n_valid, kept.to(excess.dtype), n_kept.to(excess.dtype)
    weight = torch.ones_like(excess)
    if p.weighting == "soft":
        weight = torch.sigmoid((excess - p.threshold) / p.temperature)
    if p.token_weights is not None:
        weight = weight * p.token_weights
    weight = torch.where(kept, weight, torch.zeros_like(weight))
    weight_sum = weight.view(rows).sum(dim=1)
    if p.scope == "global":
        weight_sum = _over_ranks(p, weight_sum)
    return kept, threshold, n_kept, n_valid, weight, weight_sum
