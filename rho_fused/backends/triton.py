"""The fused Triton backend: the loss in five kernel launches and no host synchronisation.

Forward: compact the valid rows (`compact_mask`, from `rho_fused.kernels.compact`), the fused
matmul + online logsumexp over vocabulary slices (`logsumexp_partials`), the epilogue giving
``lse``, ``ce`` and ``excess`` (`merge_partials`), the exact radix top-k per selection group
(`radix_top_k`). Backward: the compacted list of kept rows, then (`kept_rows_backward`) over those
only, a kernel recomputes each logits tile once and writes ``dz`` for a chunk of the vocabulary,
and cuBLAS matmuls turn it into d hidden, d weight and d bias (deterministic: no atomics).

The contract's variants run in the kernels or as torch ops on the device around them: the forward
sums the logits for label smoothing, the select kernel ranks the sampling keys, the threshold and
soft rules and the weights are elementwise ops (`rho_fused.selection.choose`), and the ``dz`` kernel
takes the weights (in ``g``), z-loss and a gradient of ``lse`` (in a per-row softmax coefficient)
and label smoothing. Every size the launches depend on is a shape; counts (valid rows, ``n_keep``,
kept rows) stay on the device, so forward and backward run under CUDA graphs. ``scope="global"`` selects with
`rho_fused.global_select` (torch ops and one all_reduce per radix digit) instead of the select
kernel. Forward and backward are custom operators (`rho_fused.backends.ops`). On CPU the kernels
run under ``TRITON_INTERPRET=1`` (how the tests prove them). fp64 inputs go to the chunked
backend: the kernels accumulate in fp32, and the contract asks fp64.

Triton launches on the *current* CUDA device, not the tensors' device, so every launch here runs
under ``torch.cuda.device(<the tensors' device>)`` (`_on_device`; a no-op on CPU).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

# rho_fused.kernels is the top-level kernels/ folder of the repository, which setup.py installs into
# this package (package_dir); read the kernels there.
from rho_fused.kernels.backward import kept_rows_backward
from rho_fused.kernels.compact import compact_mask
from rho_fused.kernels.forward import logsumexp_partials
from rho_fused.kernels.merge import merge_partials
from rho_fused.kernels.select import radix_top_k

from ..problem import (
    LossProblem,
    SelectionStats,
    keep_count_int,
    keep_fraction,
    reduce_loss,
    reference_loss,
    token_term,
)
from ..selection import choose
from . import chunked
from .ops import define

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_device(p: LossProblem) -> None:
    """The kernels run on CUDA, or anywhere under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if p.hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got tensors on {p.hidden.device}; use backend='chunked' "
            "(or 'auto') there, or set TRITON_INTERPRET=1 before the first triton-backend call (triton "
            "reads it when the kernels are first imported) to run them in Triton's interpreter"
        )


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(t.device)`` for CUDA tensors (Triton launches on the current device), else a no-op."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def kept_capacity(p: LossProblem) -> int:
    """The largest kept count of this call the selection can produce, known on the host: per group
    of ``M`` rows ``max(1, ceil(keep_ratio * M))`` (the count when every row is valid), summed; ``N``
    for ``scope="global"``, where a rank may keep every row it holds, and for the threshold and
    soft rules, which may keep every valid row."""
    n = p.targets.numel()
    if p.scope == "global" or p.groups == 0 or not p.counts_like_top_k:
        return n
    m = n // p.groups
    return min(n, p.groups * keep_count_int(m, p.keep_ratio))


def _forward(p: LossProblem) -> tuple[Tensor, ...]:
    """``(ce, lse, excess, z_sum)``, fp32 ``[N]``, 0 at ignored rows; ``z_sum = sum_v z_v`` only
    under label smoothing (else None)."""
    rows, count = compact_mask(p.valid)
    smooth = p.label_smoothing != 0
    part = logsumexp_partials(p.hidden, p.weight, p.bias, p.targets, rows, count, p.softcap, z_sum=smooth)
    ref = reference_loss(p)  # K references combined on the device (torch ops)
    merged = merge_partials(*part[:3], p.targets, ref, p.ignore_index, part_z=part[3] if smooth else None)
    lse, ce, excess = merged[:3]
    return ce, lse, excess, merged[3] if smooth else None


def loss_forward(p: LossProblem) -> tuple[Tensor, ...]:
    """Steps 1 to 6: ``(loss, ce, excess, kept, threshold, n_kept, n_valid, weight, weight_sum, lse, aux)``;
    ``aux`` is empty (the backward needs ``lse`` alone)."""
    _check_device(p)
    with _on_device(p.hidden):
        ce, lse, excess, z_sum = _forward(p)

        def top_k(score: Tensor, valid: Tensor) -> tuple[Tensor, ...]:
            # the radix select kernel; scope="global" goes to rho_fused.global_select in `choose`
            return radix_top_k(score, p.targets, p.groups, p.ignore_index, keep_fraction(p.keep_ratio))

        kept, threshold, n_kept, n_valid, weight, weight_sum = choose(p, excess, p.valid, top_k)
        term = token_term(p, ce, lse, z_sum)
        per_token = torch.where(kept, term * weight if p.weighted else term, torch.zeros_like(ce))
        loss = reduce_loss(p, per_token, weight_sum)
    return loss, ce, excess, kept, threshold, n_kept, n_valid, weight, weight_sum, lse, lse.new_empty(0)


def loss_backward(
    p: LossProblem, lse: Tensor, _aux: Tensor, rows: Tensor, g: Tensor, g_lse: Tensor | None, needs: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Step 7 over the rows of the mask ``rows``, compacted again here (one small kernel) rather than saved.
    z-loss and ``lse``'s gradient go in as the per-row softmax coefficient ``a = g (1 + 2 c lse) + g_lse``."""
    coef = None
    if p.z_loss or g_lse is not None:
        coef = (g * (1 + 2 * p.z_loss * lse) if p.z_loss else g).float().expand(lse.shape[0])
        coef = (coef if g_lse is None else coef + g_lse).contiguous()
    g = g.float().contiguous()
    with _on_device(p.hidden):
        kept_rows, kept_count = compact_mask(rows)
        return kept_rows_backward(
            p.hidden,
            p.weight,
            p.bias,
            p.targets,
            lse,
            g,
            kept_rows,
            kept_count,
            p.softcap,
            needs,
            capacity=kept_capacity(p) if g_lse is None else p.targets.numel(),
            softmax_coef=coef,
            label_smoothing=p.label_smoothing,
        )


def _token_losses(p: LossProblem) -> Tensor:
    _check_device(p)
    with _on_device(p.hidden):
        return _forward(p)[0]


_OPS = define(
    "triton",
    loss_forward,
    loss_backward,
    _token_losses,
    lambda hidden: hidden.new_empty(0, dtype=torch.float32),  # nothing beyond lse
)


def selective_loss(p: LossProblem) -> tuple[Tensor, Tensor, SelectionStats]:
    """The contract's loss; autograd runs the kept-rows-only backward kernel. fp64 goes to `chunked`."""
    if p.hidden.dtype not in KERNEL_DTYPES:
        return chunked.selective_loss(p)
    return _OPS.selective_loss(p)


def token_losses(p: LossProblem) -> Tensor:
    """Per-token cross-entropy, fp32, 0 at ignored tokens: the forward kernels alone."""
    if p.hidden.dtype not in KERNEL_DTYPES:
        return chunked.token_losses(p)
    return _OPS.token_losses(p)
