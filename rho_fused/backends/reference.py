"""The oracle: the contract transcribed literally, with full fp32 logits and autograd.

Clarity over speed; every other backend is tested against this one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..problem import LossProblem, SelectionStats, keep_count, make_stats
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


def _cross_entropy(p: LossProblem) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1 and 3: ``(ce, lse, mean_v z_v)``; ``ce = lse - z[target]`` for valid tokens, all 0 elsewhere."""
    z = _logits(p)
    valid = p.valid
    target = torch.where(valid, p.targets, 0)
    lse = torch.logsumexp(z, dim=1)
    ce = lse - z.gather(1, target[:, None]).squeeze(1)
    zero = torch.zeros_like(ce)
    return torch.where(valid, ce, zero), torch.where(valid, lse, zero), torch.where(valid, z.mean(dim=1), zero)


def _reference(p: LossProblem) -> Tensor | None:
    """Step 4's ``ref_i``: ``ref_loss``, or its K rows combined by ``ref_reduce``."""
    if p.ref_loss is None or p.ref_loss.dim() == 1:
        return p.ref_loss
    return {"mean": torch.mean, "min": torch.amin, "max": torch.amax}[p.ref_reduce](p.ref_loss, dim=0)


def _sampling_keys(p: LossProblem, excess: Tensor) -> Tensor:
    """Step 5, ``"sample"``: ``log(max(excess, 0) + 1e-6) - log(-log(U))``."""
    return torch.log(excess.clamp(min=0) + 1e-6) - torch.log(-torch.log(p.uniform.to(excess.dtype)))


def _select(score: Tensor, valid: Tensor, keep_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Step 5 for one group: the ``n_keep`` valid tokens of largest score, ties to the lower index."""
    candidates = valid.nonzero().squeeze(1).tolist()
    values = score.tolist()
    n_keep = int(keep_count(torch.tensor(len(candidates)), keep_ratio))
    ranked = sorted(candidates, key=lambda i: (-values[i], i))
    kept = torch.zeros_like(valid)
    if n_keep:
        kept[torch.tensor(ranked[:n_keep], device=valid.device)] = True
    threshold = min((values[i] for i in ranked[:n_keep]), default=float("inf"))
    return kept, torch.tensor(threshold, dtype=score.dtype), torch.tensor(n_keep)


def _select_global(p: LossProblem, score: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 5 over the tokens of every rank in rank order: gather them all, select, keep our slice."""
    world = dist.get_world_size(p.group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (score.tolist(), valid.tolist()), group=p.group)
    all_score = torch.tensor([x for e, _ in gathered for x in e], dtype=score.dtype)
    all_valid = torch.tensor([x for _, v in gathered for x in v], dtype=torch.bool)
    kept, threshold, n_kept = _select(all_score, all_valid, p.keep_ratio)
    start = sum(len(e) for e, _ in gathered[: dist.get_rank(p.group)])
    kept = kept[start : start + score.shape[0]].to(score.device)
    return kept, threshold.to(score.device), n_kept.to(score.device), all_valid.sum().to(score.device)


def _over_ranks(p: LossProblem, value: Tensor) -> Tensor:
    """``value`` summed over the ranks of ``p.group`` (scope="global")."""
    total = value.clone()
    dist.all_reduce(total, group=p.group)
    return total


def selective_loss(p: LossProblem) -> tuple[Tensor, Tensor, SelectionStats]:
    """Steps 1 to 7; gradients come from autograd through the kept tokens' terms (step 7)."""
    check_values(p)
    with torch.autocast(p.hidden.device.type, enabled=False):  # inputs are already in autocast's dtype
        return _selective_loss(p)


def _selective_loss(p: LossProblem) -> tuple[Tensor, Tensor, SelectionStats]:
    ce, lse, z_mean = _cross_entropy(p)
    valid = p.valid
    ref = _reference(p)
    excess = ce.detach() if ref is None else ce.detach() - ref
    excess = torch.where(valid, excess, torch.zeros_like(excess))

    # step 5: the kept set, ranked by score (excess, or the sampling keys)
    score = _sampling_keys(p, excess) if p.selection == "sample" else excess
    rows = p.group_shape
    if p.weighting == "soft" or p.selection == "threshold":
        kept = valid if p.weighting == "soft" else valid & (excess > p.threshold)
        n_kept, n_valid = kept.view(rows).sum(dim=1), valid.view(rows).sum(dim=1)
        if p.scope == "global":
            n_kept, n_valid = _over_ranks(p, n_kept), _over_ranks(p, n_valid)
        threshold = torch.full((p.groups,), p.threshold, dtype=excess.dtype, device=ce.device)
    elif p.scope == "global":
        kept, threshold, n_kept, n_valid = _select_global(p, score, valid)
    else:
        groups = [_select(e, v, p.keep_ratio) for e, v in zip(score.view(rows), valid.view(rows), strict=True)]
        if groups:
            kept = torch.cat([g[0] for g in groups]).to(ce.device)
            threshold = torch.stack([g[1] for g in groups]).to(ce.device)
            n_kept = torch.stack([g[2] for g in groups]).to(ce.device)
        else:  # zero sequences: no groups, no tokens
            kept, threshold, n_kept = valid, excess.new_empty(0), valid.new_zeros(0, dtype=torch.int64)
        n_valid = valid.view(rows).sum(dim=1)

    # the weights W_i of the kept tokens, constants
    weight = kept.to(ce.dtype)
    if p.weighting == "soft":
        weight = weight * torch.sigmoid((excess - p.threshold) / p.temperature)
    if p.token_weights is not None:
        weight = weight * p.token_weights
    weight = torch.where(kept, weight, torch.zeros_like(weight))
    weight_sum = weight.view(rows).sum(dim=1)
    if p.scope == "global":
        weight_sum = _over_ranks(p, weight_sum)

    # step 6: each kept token's term, then the reduction; step 7: the mask and weights are constants
    term = ce
    if p.label_smoothing:  # (skipped at 0: a -inf logit makes lse - mean z infinite, and 0 * inf NaN)
        term = (1 - p.label_smoothing) * ce + p.label_smoothing * (lse - z_mean)
    if p.z_loss:
        term = term + p.z_loss * lse**2
    per_token = torch.where(kept, weight * term, torch.zeros_like(term))
    if p.reduction == "none":
        loss = per_token.view(p.shape)
    elif p.reduction == "sum":
        loss = per_token.sum()
    else:
        total = weight_sum.sum()
        loss = per_token.sum() / torch.where(total > 0, total, torch.ones_like(total))
    stats = make_stats(p, ce, excess, kept, threshold, n_kept, n_valid, lse, weight, weight_sum)
    return loss, lse.view(p.shape), stats


@torch.no_grad()
def token_losses(p: LossProblem) -> Tensor:
    """Per-token cross-entropy, fp32, 0 at ignored tokens."""
    check_values(p)
    with torch.autocast(p.hidden.device.type, enabled=False):
        return _cross_entropy(p)[0].float()
