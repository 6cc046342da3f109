"""Pure-PyTorch backend that never holds more than one chunk of logits.

Forward: valid tokens in chunks of rows; each chunk's logits give its ``lse`` and ``ce`` and are
dropped. Selection over the per-token excess (O(N) memory). Backward: only the kept rows,
recomputing their logits once per chunk,

    d z_i = g_i * (softmax(z_i) - onehot(t_i))            (times 1 - tanh^2 under a softcap)
    d hidden_i = d z_i @ W,   d W = sum_i d z_i^T hidden_i,   d bias = sum_i d z_i

where ``g_i`` is the upstream gradient of token ``i``'s term of the loss.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..problem import LossProblem, SelectionStats, make_stats, reduce_loss
from ..selection import select

# Working memory for one chunk's logits-sized buffers; the chunk's row count follows from it.
CHUNK_BUDGET_BYTES = 64 * 2**20
# Logits-sized buffers alive at once: the logits and one temporary (logsumexp's, or tanh's).
CHUNK_BUFFERS = 2


def chunk_rows(p: LossProblem) -> int:
    """Rows per chunk such that ``CHUNK_BUFFERS`` buffers of ``[rows, V]`` fit the budget."""
    row_bytes = p.weight.shape[0] * p.compute_dtype.itemsize * CHUNK_BUFFERS
    return max(1, CHUNK_BUDGET_BYTES // row_bytes)


def _head(p: LossProblem) -> tuple[Tensor, Tensor | None]:
    """Weight and bias in the compute dtype (no copy for fp32 inputs)."""
    dtype = p.compute_dtype
    return p.weight.to(dtype), None if p.bias is None else p.bias.to(dtype)


def _logits(p: LossProblem, h: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``z = cap(h @ w.T + b)``; under a softcap also returns ``tanh(u / c)`` for the backward."""
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    if p.softcap is None:
        return z, None
    tanh = z.div_(p.softcap).tanh_()
    return tanh * p.softcap, tanh


def _forward(p: LossProblem) -> tuple[Tensor, Tensor]:
    """``(ce, lse)`` per token in the compute dtype, 0 at ignored tokens, which cost nothing."""
    dtype = p.compute_dtype
    n = p.targets.shape[0]
    ce = torch.zeros(n, dtype=dtype, device=p.hidden.device)
    lse = torch.zeros_like(ce)
    w, b = _head(p)
    rows = p.valid.nonzero().squeeze(1)
    for idx in rows.split(chunk_rows(p)):
        z, _ = _logits(p, p.hidden.index_select(0, idx).to(dtype), w, b)
        lse_chunk = torch.logsumexp(z, dim=1)
        lse[idx] = lse_chunk
        ce[idx] = lse_chunk - z.gather(1, p.targets[idx, None]).squeeze(1)
    return ce, lse


def _backward(
    p: LossProblem, lse: Tensor, kept_idx: Tensor, g: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum_i g_i * ce_i`` over the kept rows ``kept_idx`` (``g`` aligned with them)."""
    dtype = p.compute_dtype
    w, b = _head(p)
    n_vocab, dim = w.shape
    dh = torch.zeros_like(p.hidden) if needs[0] else None
    dw = torch.zeros(n_vocab, dim, dtype=dtype, device=w.device) if needs[1] else None
    db = torch.zeros(n_vocab, dtype=dtype, device=w.device) if needs[2] else None
    step = chunk_rows(p)
    for start in range(0, kept_idx.shape[0], step):
        idx = kept_idx[start : start + step]
        h = p.hidden.index_select(0, idx).to(dtype)
        dz, tanh = _logits(p, h, w, b)
        dz.sub_(lse[idx, None]).exp_()  # softmax, in place
        dz[torch.arange(idx.shape[0], device=idx.device), p.targets[idx]] -= 1.0
        dz.mul_(g[start : start + step, None])
        if tanh is not None:
            dz.mul_(tanh.square_().neg_().add_(1.0))  # d cap(u) / du = 1 - tanh^2
        if dh is not None:
            dh.index_copy_(0, idx, (dz @ w).to(dh.dtype))
        if dw is not None:
            dw.addmm_(dz.T, h)
        if db is not None:
            db.add_(dz.sum(dim=0))
    return (
        dh,
        None if dw is None else dw.to(p.weight.dtype),
        None if db is None else db.to(p.bias.dtype),
    )


class _SelectiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, p: LossProblem):  # type: ignore[override]
        ce, lse = _forward(p)
        valid = p.valid
        excess = ce if p.ref_loss is None else torch.where(valid, ce - p.ref_loss, torch.zeros_like(ce))
        kept, threshold, n_kept, n_valid = select(p, excess, valid)
        loss = reduce_loss(p, torch.where(kept, ce, torch.zeros_like(ce)), n_kept)

        ctx.problem = replace(p, hidden=None, weight=None, bias=None)
        ctx.save_for_backward(hidden, weight, bias, lse, kept.nonzero().squeeze(1), n_kept.sum())
        ctx.mark_non_differentiable(ce, excess, kept, threshold, n_kept, n_valid)
        return loss, ce, excess, kept, threshold, n_kept, n_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor):  # type: ignore[override]
        hidden, weight, bias, lse, kept_idx, total_kept = ctx.saved_tensors
        p = replace(ctx.problem, hidden=hidden, weight=weight, bias=bias)
        grad_loss = grad_loss.to(p.compute_dtype)
        if p.reduction == "none":
            g = grad_loss.reshape(-1)[kept_idx]
        elif p.reduction == "sum":
            g = grad_loss.expand(kept_idx.shape[0])
        else:
            g = (grad_loss / total_kept.clamp(min=1)).expand(kept_idx.shape[0])
        dh, dw, db = _backward(p, lse, kept_idx, g, ctx.needs_input_grad[:3])
        return dh, dw, db, None


def selective_loss(p: LossProblem) -> tuple[Tensor, SelectionStats]:
    """The contract's loss; autograd runs the kept-rows-only backward."""
    loss, ce, excess, kept, threshold, n_kept, n_valid = _SelectiveLoss.apply(p.hidden, p.weight, p.bias, p)
    return loss, make_stats(p, ce, excess, kept, threshold, n_kept, n_valid)


@torch.no_grad()
def token_losses(p: LossProblem) -> Tensor:
    """Per-token cross-entropy, fp32, 0 at ignored tokens; one chunk of logits at a time."""
    return _forward(p)[0].float()
