"""The oracle: the contract transcribed literally, with full fp32 logits and autograd.

Clarity over speed; every other backend is tested against this one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..problem import LossProblem, SelectionStats, keep_count, make_stats, reduce_loss
from ..validation import check_values


def _logits(p: LossProblem) -> Tensor:
    """Step 2: ``z = hidden @ weight.T (+ bias)`` in fp32 (fp64 for fp64 inputs), soft-capped."""
    dtype = p.compute_dtype
    z = p.hidden.to(dtype) @ p.weight.to(dtype).T
    if p.bias is not None:
        z = z + p.bias.to(dtype)
    if p.softcap is not None:
        z = p.softcap * torch.tanh(z / p.softcap)
    return z


def _cross_entropy(p: LossProblem) -> Tensor:
    """Steps 1 and 3: ``ce = logsumexp(z) - z[target]`` for valid tokens, 0 elsewhere."""
    z = _logits(p)
    valid = p.valid
    target = torch.where(valid, p.targets, 0)
    ce = torch.logsumexp(z, dim=1) - z.gather(1, target[:, None]).squeeze(1)
    return torch.where(valid, ce, torch.zeros_like(ce))


def _select(excess: Tensor, valid: Tensor, keep_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Step 5 for one group: the ``n_keep`` valid tokens of largest excess, ties to the lower index."""
    candidates = valid.nonzero().squeeze(1).tolist()
    values = excess.tolist()
    n_keep = int(keep_count(torch.tensor(len(candidates)), keep_ratio))
    ranked = sorted(candidates, key=lambda i: (-values[i], i))
    kept = torch.zeros_like(valid)
    if n_keep:
        kept[torch.tensor(ranked[:n_keep], device=valid.device)] = True
    threshold = min((values[i] for i in ranked[:n_keep]), default=float("inf"))
    return kept, torch.tensor(threshold, dtype=excess.dtype), torch.tensor(n_keep)


def _select_global(p: LossProblem, excess: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 5 over the tokens of every rank in rank order: gather them all, select, keep our slice."""
    world = dist.get_world_size(p.group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (excess.tolist(), valid.tolist()), group=p.group)
    all_excess = torch.tensor([x for e, _ in gathered for x in e], dtype=excess.dtype)
    all_valid = torch.tensor([x for _, v in gathered for x in v], dtype=torch.bool)
    kept, threshold, n_kept = _select(all_excess, all_valid, p.keep_ratio)
    start = sum(len(e) for e, _ in gathered[: dist.get_rank(p.group)])
    kept = kept[start : start + excess.shape[0]].to(excess.device)
    return kept, threshold.to(excess.device), n_kept.to(excess.device), all_valid.sum().to(excess.device)


def selective_loss(p: LossProblem) -> tuple[Tensor, SelectionStats]:
    """Steps 1 to 7; gradients come from autograd through the kept tokens' ``ce`` (step 7)."""
    check_values(p)
    with torch.autocast(p.hidden.device.type, enabled=False):  # inputs are already in autocast's dtype
        return _selective_loss(p)


def _selective_loss(p: LossProblem) -> tuple[Tensor, SelectionStats]:
    ce = _cross_entropy(p)
    valid = p.valid
    excess = ce.detach() if p.ref_loss is None else ce.detach() - p.ref_loss
    excess = torch.where(valid, excess, torch.zeros_like(excess))

    if p.scope == "global":
        kept, threshold, n_kept, n_valid = _select_global(p, excess, valid)
    else:
        groups = [
            _select(e, v, p.keep_ratio)
            for e, v in zip(excess.view(p.group_shape), valid.view(p.group_shape), strict=True)
        ]
        if groups:
            kept = torch.cat([g[0] for g in groups]).to(ce.device)
            threshold = torch.stack([g[1] for g in groups]).to(ce.device)
            n_kept = torch.stack([g[2] for g in groups]).to(ce.device)
        else:  # zero sequences: no groups, no tokens
            kept, threshold, n_kept = valid, excess.new_empty(0), valid.new_zeros(0, dtype=torch.int64)
        n_valid = valid.view(p.group_shape).sum(dim=1)

    per_token = torch.where(kept, ce, torch.zeros_like(ce))  # step 7: the mask is a constant
    loss = reduce_loss(p, per_token, n_kept)
    return loss, make_stats(p, ce, excess, kept, threshold, n_kept, n_valid)


@torch.no_grad()
def token_losses(p: LossProblem) -> Tensor:
    """Per-token cross-entropy, fp32, 0 at ignored tokens."""
    check_values(p)
    with torch.autocast(p.hidden.device.type, enabled=False):
        return _cross_entropy(p).float()
