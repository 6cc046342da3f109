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
    # The contract's variants (see `rho_fused.fused_selective_loss`); the defaults are plain top-k.
    ref_reduce: str = "mean"  # how K reference losses ([K, N] ref_loss) combine: "mean" | "min" | "max"
    selection: str = "topk"  # "topk" | "threshold" | "sample"
    weighting: str = "hard"  # "hard" (kept or not) | "soft" (every valid token, weight sigmoid)
    threshold: float = 0.0  # of selection="threshold" and weighting="soft"
    temperature: float = 1.0  # of weighting="soft"
    token_weights: Tensor | None = None  # [N], compute dtype, >= 0
    uniform: Tensor | None = None  # [N] fp32 U of selection="sample", drawn once per call
    z_loss: float = 0.0
    label_smoothing: float = 0.0

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

    @property
    def weighted(self) -> bool:
        """Whether kept tokens carry weights other than 1 (soft weighting or ``token_weights``)."""
        return self.weighting == "soft" or self.token_weights is not None

    @property
    def counts_like_top_k(self) -> bool:
        """Whether the kept count is ``n_keep`` of ``keep_ratio`` (top-k and sampling)."""
        return self.weighting == "hard" and self.selection in ("topk", "sample")


def reference_loss(p: LossProblem) -> Tensor | None:
    """Step 4's ``ref_loss_i``: the one reference's loss, or the K references combined by ``ref_reduce``."""
    ref = p.ref_loss
    if ref is None or ref.dim() == 1:
        return ref
    if p.ref_reduce == "min":
        return ref.amin(0)
    if p.ref_reduce == "max":
        return ref.amax(0)
    return ref.mean(0)


def token_term(p: LossProblem, ce: Tensor, lse: Tensor, z_sum: Tensor | None) -> Tensor:
    """Each token's term before weighting: ``(1 - eps) ce + eps (lse - sum_v z_v / V) + c lse^2``.

    ``ce = lse - z_target``, so the first two parts are torch's label-smoothed cross-entropy;
    ``z_sum`` is ``sum_v z_v`` (needed only when ``label_smoothing > 0``).
    """
    term = ce
    if p.label_smoothing:
        eps = p.label_smoothing
        term = (1 - eps) * ce + eps * (lse - z_sum / p.weight.shape[0])
    if p.z_loss:
        term = term + p.z_loss * lse.square()
    return term


@dataclass(frozen=True)
class SelectionStats:
    """What the selection saw, all detached.

    ``ce``, ``excess`` and ``lse`` have the shape of ``targets`` (0 at ignored tokens); ``kept`` is
    the boolean mask of kept tokens; ``weight`` each token's weight in the loss (``kept`` as 0/1
    times the soft weight and ``token_weights``). Per selection group: ``threshold`` is the
    threshold used (top-k: the smallest kept excess, ``+inf`` where nothing is kept; sampling: the
    smallest kept sampling key; ``"threshold"`` and soft weighting: the ``threshold`` given);
    ``n_kept`` and ``n_valid`` count tokens; ``weight_sum`` sums ``weight``, the denominator of
    ``mean``. For ``scope="batch"`` these four are scalars, for ``scope="sequence"`` they have
    shape ``[B]``, for ``scope="global"`` they are scalars over all ranks.
    """

    ce: Tensor
    excess: Tensor
    kept: Tensor
    threshold: Tensor
    n_kept: Tensor
    n_valid: Tensor
    lse: Tensor | None = None
    weight: Tensor | None = None
    weight_sum: Tensor | None = None


def _denominator(weight_sum: Tensor) -> Tensor:
    """The total of the groups' weight sums, 1 where it is 0 (nothing kept: the loss is 0)."""
    total = weight_sum.sum()
    return torch.where(total > 0, total, torch.ones_like(total))


def reduce_loss(p: LossProblem, per_token: Tensor, weight_sum: Tensor) -> Tensor:
    """Step 6: ``sum(w_i term_i) / sum(w_i)`` (mean), the sum, or per token in the targets' shape.

    ``per_token`` is ``w_i term_i`` over the flattened tokens (0 where not kept); ``weight_sum``
    sums the kept tokens' weights per group (their count without weights).
    """
    if p.reduction == "none":
        return per_token.view(p.shape)
    if p.reduction == "sum":
        return per_token.sum()
    return per_token.sum() / _denominator(weight_sum.to(per_token.dtype))


def upstream(p: LossProblem, grad_loss: Tensor, weight_sum: Tensor, dtype: torch.dtype) -> Tensor:
    """The gradient of the loss with respect to each kept token's weighted term ``w_i term_i``.

    ``"none"``: the upstream gradient of token ``i``, ``[N]``; ``"sum"``: the one upstream value,
    ``[1]``; ``"mean"``: that value over the total weight (on the device), ``[1]``. Times ``w_i``
    it is the gradient with respect to ``term_i``.
    """
    grad_loss = grad_loss.to(dtype)
    if p.reduction == "none":
        return grad_loss.reshape(-1).contiguous()
    if p.reduction == "sum":
        return grad_loss.reshape(1)
    return (grad_loss / _denominator(weight_sum.to(dtype))).reshape(1)


def make_stats(
    p: LossProblem,
    ce: Tensor,
    excess: Tensor,
    kept: Tensor,
    threshold: Tensor,
    n_kept: Tensor,
    n_valid: Tensor,
    lse: Tensor,
    weight: Tensor,
    weight_sum: Tensor,
) -> SelectionStats:
    """Detached stats in the caller's shapes; per-group values are scalars unless ``scope="sequence"``."""
    if p.scope != "sequence":
        threshold, n_kept, n_valid = threshold.reshape(()), n_kept.reshape(()), n_valid.reshape(())
        weight_sum = weight_sum.reshape(())
    return SelectionStats(
        ce=ce.detach().reshape(p.shape),
        excess=excess.detach().reshape(p.shape),
        kept=kept.reshape(p.shape),
        threshold=threshold.detach(),
        n_kept=n_kept,
        n_valid=n_valid,
        lse=lse.detach().reshape(p.shape),
        weight=weight.detach().reshape(p.shape),
        weight_sum=weight_sum.detach(),
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
