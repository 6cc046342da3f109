"""The public loss functions. `fused_selective_loss` holds the contract every backend meets."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import backends
from .problem import IGNORE_INDEX, SelectionStats
from .validation import make_problem


def fused_selective_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_loss: Tensor | None = None,
    *,
    keep_ratio: float = 0.6,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    scope: str = "batch",
    softcap: float | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    group: torch.distributed.ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, SelectionStats]:
    """Selective language-modelling loss (Rho-1) of an LM head, without materialising the logits.

    Inputs: ``hidden [..., D]`` (``[N, D]`` or ``[B, T, D]``), ``weight [V, D]`` (the LM head),
    optional ``bias [V]``, ``targets [...]`` (integers; ``ignore_index`` marks tokens that are not
    scored), ``ref_loss [...]`` (the reference model's loss for predicting ``targets[i]``, same
    shape as ``targets``), ``keep_ratio`` in (0, 1].

    1. ``valid_i = targets_i != ignore_index``.
    2. ``z_i = hidden_i @ weight.T (+ bias)``, accumulated in fp32 whatever the input dtype
       (fp64 for fp64 inputs); with ``softcap=c``, ``z = c * tanh(z / c)``.
    3. ``ce_i = logsumexp(z_i) - z_i[targets_i]`` for valid tokens.
    4. ``excess_i = ce_i - ref_loss_i`` for valid tokens (``excess_i = ce_i`` when ``ref_loss`` is None).
    5. In each selection group (``scope="batch"``: every token of the call; ``"sequence"``: each
       row of ``[B, T]`` targets; ``"global"``: every token of the call on every rank of the
       process group ``group``, in rank order), ``n_keep = ceil(keep_ratio * n_valid)``, at least 1 when
       ``n_valid >= 1``, computed exactly: ``keep_ratio`` is read as the nearest fraction with
       denominator at most 10^6, so 0.7 of 10 valid tokens keeps exactly 7. The kept set is the
       ``n_keep`` valid tokens with the largest excess; ties go to the lower flattened index.
       Exactly ``n_keep`` tokens are kept.
    6. ``reduction="mean"``: ``sum(ce_i for kept i) / n_keep`` (over all groups: the total kept
       count); ``"sum"``: the sum; ``"none"``: ``ce_i * kept_i`` in the shape of ``targets``.
    7. Gradients flow through ``ce_i`` of kept tokens only; the selection is a constant, and
       ``ref_loss`` receives no gradient.

    ``scope="global"`` (torch.distributed initialised; ``group`` defaults to the default group):
    every rank calls with its own tokens and gets the exact global selection, found by summing
    radix-select histograms across ranks (excess compared in fp32). With ``mean``, each rank
    returns ``sum(ce of its kept tokens) / n_keep_global``, so the sum over ranks is the global
    loss, each rank's gradient of its own ``hidden`` is exact, and the global gradient of shared
    weights is the *sum* of the ranks' gradients: DDP averages gradients, so a DDP user multiplies
    the loss by the world size. A rank with no valid token still joins every collective.

    With no valid token the loss is 0 and every gradient is 0. With ``ref_loss=None`` and
    ``keep_ratio=1.0`` the result equals ``F.cross_entropy(hidden @ weight.T + bias, targets)``.
    The loss is fp32 (fp64 for fp64 inputs); gradients come back in the inputs' dtypes.
    Under ``torch.autocast(device, dtype)`` the result is that of ``hidden``, ``weight`` and
    ``bias`` cast to ``dtype`` first (fp64 excepted), as ``F.linear`` computes; gradients come back
    in the leaves' dtypes. Any strides are accepted (slices, transposes, expanded views).

    Value checks: targets outside ``[0, V)`` and non-finite ``ref_loss`` at valid tokens raise
    ``ValueError``. They read values back to the host (one synchronisation per call) and run inside
    the backend's operator, under ``torch.compile`` too; they are skipped while a CUDA graph is
    captured, and everywhere when ``rho_fused.validation.CHECK_VALUES`` is False. The triton
    backend's forward and backward read nothing else back: they run under CUDA graphs. ``torch.compile`` traces a
    call with ``fullgraph=True`` on the ``chunked`` and ``triton`` backends (one custom operator
    each; the ``reference`` backend sorts on the host and breaks the graph).

    ``backend``: ``"reference"`` (full fp32 logits, the oracle), ``"chunked"`` (pure PyTorch,
    one chunk of logits at a time, backward on kept rows only), ``"triton"`` (fused kernels), or
    ``"auto"``: ``triton`` for CUDA tensors, ``chunked`` otherwise.

    Returns the loss, or ``(loss, SelectionStats)`` with ``return_stats=True``.
    """
    problem = make_problem(
        hidden,
        weight,
        targets,
        ref_loss,
        keep_ratio=keep_ratio,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        scope=scope,
        softcap=softcap,
        group=group,
    )
    loss, stats = backends.resolve(backend, hidden.device).selective_loss(problem)
    return (loss, stats) if return_stats else loss


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    softcap: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Plain fused cross-entropy of an LM head: `fused_selective_loss` keeping every valid token.

    ``mean`` divides by the number of valid tokens, as ``F.cross_entropy`` does; ``none`` gives
    0 at ignored tokens.
    """
    return fused_selective_loss(
        hidden,
        weight,
        targets,
        None,
        keep_ratio=1.0,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        backend=backend,
    )


def token_losses(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-token cross-entropy ``ce_i`` (steps 1-3 of the contract) in the shape of ``targets``.

    fp32, 0 at ignored tokens, no autograd graph: how a reference model scores a corpus.
    """
    problem = make_problem(
        hidden,
        weight,
        targets,
        None,
        keep_ratio=1.0,
        bias=bias,
        ignore_index=ignore_index,
        reduction="none",
        scope="batch",
        softcap=softcap,
    )
    with torch.no_grad():
        ce = backends.resolve(backend, hidden.device).token_losses(problem)
    return ce.reshape(problem.shape)


class SelectiveLMLoss(nn.Module):
    """`fused_selective_loss` as a module: the options fixed at construction.

    ``loss_fn = SelectiveLMLoss(keep_ratio=0.6)``; ``loss = loss_fn(hidden, lm_head.weight,
    targets, ref_loss)``.
    """

    def __init__(
        self,
        keep_ratio: float = 0.6,
        *,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        scope: str = "batch",
        softcap: float | None = None,
        backend: str = "auto",
        group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.keep_ratio = keep_ratio
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.scope = scope
        self.softcap = softcap
        self.backend = backend
        self.group = group

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ref_loss: Tensor | None = None,
        bias: Tensor | None = None,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, SelectionStats]:
        return fused_selective_loss(
            hidden,
            weight,
            targets,
            ref_loss,
            keep_ratio=self.keep_ratio,
            bias=bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            scope=self.scope,
            softcap=self.softcap,
            backend=self.backend,
            return_stats=return_stats,
            group=self.group,
        )

    def extra_repr(self) -> str:
        return (
            f"keep_ratio={self.keep_ratio}, scope={self.scope!r}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
