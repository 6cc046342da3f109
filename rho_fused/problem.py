"""The validated, flattened form of one loss call, handed to every backend.

`rho_fused.validation.make_problem` builds a `LossProblem` from the public arguments; a backend
module exposes two functions over it:

    selective_loss(p: LossProblem) -> tuple[Tensor, SelectionStats]
    token_losses(p: LossProblem) -> Tensor   # fp32 [N], 0 at ignored rows, no autograd graph
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

# The target that marks a token as not scored, as in F.cross_entropy and Hugging Face labels.
IGNORE_INDEX = -100


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
    def group_shape(self) -> tuple[int, int]:
        """``(groups, M)``: the flat ``[N]`` tokens as one row per selection group (``M`` may be 0)."""
        return self.groups, self.targets.numel() // self.groups if self.groups else 0

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


def upstream(p: LossProblem, grad_loss: Tensor, n_kept: Tensor, dtype: torch.dtype) -> Tensor:
    """``g``, the gradient of the loss with respect to each kept token's ``ce_i``, in ``dtype``.

    ``"none"``: the upstream gradient of token ``i``, ``[N]``; ``"sum"``: the one upstream value,
    ``[1]``; ``"mean"``: that value over the total kept count (on the device), ``[1]``.
    """
    grad_loss = grad_loss.to(dtype)
    if p.reduction == "none":
        return grad_loss.reshape(-1).contiguous()
    if p.reduction == "sum":
        return grad_loss.reshape(1)
    return (grad_loss / n_kept.sum().clamp(min=1)).reshape(1)


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


# keep_ratio is read as the nearest fraction p / q with q <= this bound, so that a decimal
# ratio means what it says: 0.7 is 7/10 exactly, and 0.7 of 10 tokens keeps 7, never 8.
MAX_DENOMINATOR = 1_000_000


def keep_fraction(keep_ratio: float) -> tuple[int, int]:
    """``keep_ratio`` as an exact fraction ``(p, q)``, ``0 <= p <= q <= MAX_DENOMINATOR``."""
    f = Fraction(keep_ratio).limit_denominator(MAX_DENOMINATOR)
    return f.numerator, f.denominator


def keep_count_int(n_valid: int, keep_ratio: float) -> int:
    """`keep_count` for a Python integer, on the host: what a training loop divides by."""
    p, q = keep_fraction(keep_ratio)
    return max(1, (n_valid * p + q - 1) // q) if n_valid > 0 else 0


def keep_count(n_valid: Tensor, keep_ratio: float) -> Tensor:
    """``n_keep = max(1, ceil(p * n_valid / q))`` where ``n_valid >= 1``, else 0, in integers.

    Integer arithmetic on the tensor's device: exact, and no host synchronisation.
    """
    p, q = keep_fraction(keep_ratio)
    n_keep = (n_valid * p + (q - 1)) // q
    return torch.where(n_valid > 0, n_keep.clamp(min=1), torch.zeros_like(n_keep))
