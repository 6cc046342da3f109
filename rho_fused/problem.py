"""The validated, flattened form of one loss call, handed to every backend.

`rho_fused.validation.make_problem` builds a `LossProblem` from the public arguments; a backend
module exposes two functions over it:

    selective_loss(p: LossProblem) -> tuple[Tensor, SelectionStats]
    token_losses(p: LossProblem) -> Tensor   # fp32 [N], 0 at ignored rows, no autograd graph
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossProblem:
    """One call's inputs, flattened to tokens.

    Selection groups are contiguous: group ``g`` holds rows ``g * M .. (g + 1) * M`` of the
    flattened tokens, ``M = N // groups``. ``scope="batch"`` is one group, ``scope="sequence"``
    one group per row of ``[B, T]`` targets.
    """

    hidden: Tensor  # [N, D], contiguous, fp32 / bf16 / fp16 / fp64
    weight: Tensor  # [V, D], same dtype and device as hidden
    bias: Tensor | None  # [V], same dtype as hidden
    targets: Tensor  # [N], int64
    ref_loss: Tensor | None  # [N], fp32 (fp64 for fp64 inputs); None: excess = ce
    shape: torch.Size  # leading shape of the caller's targets; reduction="none" returns it
    scope: str  # "batch" | "sequence" | "global"
    groups: int  # number of selection groups
    keep_ratio: float
    ignore_index: int
    reduction: str  # "mean" | "sum" | "none"
    softcap: float | None
    group: object = None  # the process group of scope="global" (None: the default group)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Logits are accumulated in fp32, or fp64 when the inputs are fp64."""
        return torch.promote_types(self.hidden.dtype, torch.float32)

    @property
    def valid(self) -> Tensor:
        """``targets != ignore_index``, [N] bool."""
        return self.targets != self.ignore_index


@dataclass(frozen=True)
class SelectionStats:
    """What the selection saw, all detached.

    ``ce`` and ``excess`` have the shape of ``targets`` (0 at ignored tokens); ``kept`` is the
    boolean mask of kept tokens. ``threshold`` is the smallest kept excess of each selection
    group (``+inf`` where nothing is kept); ``n_kept`` and ``n_valid`` count tokens per group.
    For ``scope="batch"`` these three are scalars, for ``scope="sequence"`` they have shape ``[B]``,
    for ``scope="global"`` they are scalars counted over all ranks.
    """

    ce: Tensor
    excess: Tensor
    kept: Tensor
    threshold: Tensor
    n_kept: Tensor
    n_valid: Tensor


def reduce_loss(p: LossProblem, per_token: Tensor, n_kept: Tensor) -> Tensor:
    """Step 6: ``sum(ce_i * kept_i) / n_keep`` (mean), the sum, or per token in the targets' shape.

    ``per_token`` is ``ce_i * kept_i`` over the flattened tokens; ``n_kept`` counts kept tokens
    per group (the mean divides by their total; 1 when nothing is kept, so the loss is 0).
    """
    if p.reduction == "none":
        return per_token.view(p.shape)
    if p.reduction == "sum":
        return per_token.sum()
    return per_token.sum() / n_kept.sum().clamp(min=1)


def make_stats(
    p: LossProblem, ce: Tensor, excess: Tensor, kept: Tensor, threshold: Tensor, n_kept: Tensor, n_valid: Tensor
) -> SelectionStats:
    """Detached stats in the caller's shapes; per-group values are scalars for ``scope="batch"``."""
    if p.scope != "sequence":
        threshold, n_kept, n_valid = threshold.reshape(()), n_kept.reshape(()), n_valid.reshape(())
    return SelectionStats(
        ce=ce.detach().reshape(p.shape),
        excess=excess.detach().reshape(p.shape),
        kept=kept.reshape(p.shape),
        threshold=threshold.detach(),
        n_kept=n_kept,
        n_valid=n_valid,
    )
