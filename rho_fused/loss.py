"""The public loss functions. `fused_selective_loss` holds the contract every backend meets."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import backends
from .problem import IGNORE_INDEX
from .validation import make_problem


def fused_selective_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_loss: Tensor | None = None,
    *,
    keep_ratio: float | None = None,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    scope: str = "batch",
    softcap: float | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    group: torch.distributed.ProcessGroup | None = None,
    selection: str = "topk",
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    weighting: str = "hard",
    temperature: float | None = None,
    token_weights: Tensor | None = None,
    ref_reduce: str = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Selective language-modelling loss (Rho-1) of an LM head, without materialising the logits.

    Inputs: ``hidden [..., D]`` (``[N, D]`` or ``[B, T, D]``), ``weight [V, D]`` (the LM head),
    optional ``bias [V]``, ``targets [...]`` (integers; ``ignore_index`` marks tokens that are not
    scored), ``ref_loss`` (the reference model's loss for predicting ``targets[i]``: the shape of
    ``targets``, or ``[K, *targets.shape]`` for K reference models), ``keep_ratio`` in (0, 1]
    (default 0.6), optional ``token_weights`` (the shape of ``targets``, >= 0).

    1. ``valid_i = targets_i != ignore_index``.
    2. ``z_i = hidden_i @ weight.T (+ bias)``, accumulated in fp32 whatever the input dtype
       (fp64 for fp64 inputs); with ``softcap=c``, ``z = c * tanh(z / c)``.
    3. ``lse_i = logsumexp(z_i)`` and ``ce_i = lse_i - z_i[targets_i]`` for valid tokens.
    4. ``excess_i = ce_i - ref_i`` for valid tokens (``excess_i = ce_i`` when ``ref_loss`` is None),
       where ``ref_i`` is ``ref_loss_i``, or with K references their ``ref_reduce`` over K:
       ``"mean"`` (default), ``"min"`` or ``"max"``. Selection always ranks this plain excess.
    5. In each selection group (``scope="batch"``: every token of the call; ``"sequence"``: each
       row of ``[B, T]`` targets; ``"global"``: every token of the call on every rank of the
       process group ``group``, in rank order), the kept set by ``selection``:

       - ``"topk"`` (default): ``n_keep = ceil(keep_ratio * n_valid)``, at least 1 when
         ``n_valid >= 1``, computed exactly: ``keep_ratio`` is read as the nearest fraction with
         denominator at most 10^6, so 0.7 of 10 valid tokens keeps exactly 7. The kept set is the
         ``n_keep`` valid tokens with the largest excess; ties go to the lower flattened index.
         Exactly ``n_keep`` tokens are kept.
       - ``"threshold"``: the valid tokens with ``excess_i > threshold`` (default 0.0).
         ``keep_ratio`` does not apply and may not be given.
       - ``"sample"``: ``n_keep`` tokens (counted as for top-k) drawn without replacement with
         probability proportional to ``max(excess_i, 0) + 1e-6``, by Gumbel top-k: with
         ``U = torch.rand(targets.shape, generator=generator, dtype=torch.float32,
         device=targets.device)`` (drawn once per call) the keys are
         ``key_i = log(max(excess_i, 0) + 1e-6) - log(-log(U_i))``, and the ``n_keep`` valid
         tokens of largest key are kept, ties to the lower index. The same ``generator`` state
         keeps the same tokens on every backend.

       With ``weighting="soft"`` nothing is dropped: every valid token is kept with weight
       ``w_i = sigmoid((excess_i - threshold) / temperature)`` (defaults 0.0 and 1.0), a constant;
       otherwise ``w_i = 1``. ``token_weights`` multiply: a kept token's weight is
       ``W_i = w_i * token_weights_i`` (``w_i`` without them).
    6. Each kept token's term is ``term_i = (1 - eps) * ce_i + eps * (lse_i - mean_v z_iv)
       + c * lse_i^2`` with ``eps = label_smoothing`` in [0, 1] (torch's definition) and
       ``c = z_loss >= 0``; plainly ``ce_i``. ``reduction="mean"``: ``sum(W_i term_i) / sum(W_i)``
       over the kept tokens of all groups (0 when that sum is 0; without weights,
       ``sum(term_i) / n_keep``); ``"sum"``: ``sum(W_i term_i)``; ``"none"``: ``W_i term_i`` in the
       shape of ``targets``, 0 where not kept.
    7. Gradients flow through ``term_i`` of kept tokens only; the selection and the weights are
       constants, and ``ref_loss`` and ``token_weights`` receive no gradient.

    ``return_lse=True`` also returns ``lse`` (step 3) in the shape of ``targets``, in the loss's
    dtype, 0 at ignored tokens, and differentiable: when it receives a gradient, the backward
    covers every valid token (kept or not), adding ``grad_lse_i * softmax(z_i)`` to ``d z_i``.

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

    Returns the loss; with ``return_lse`` and ``return_stats``, ``(loss, lse)``, ``(loss, stats)`` or
    ``(loss, lse, stats)``.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
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
        selection=selection,
        weighting=weighting,
        threshold=threshold,
        temperature=temperature,
        generator=generator,
        token_weights=token_weights,
        ref_reduce=ref_reduce,
        z_loss=z_loss,
        label_smoothing=label_smoothing,
    )
    loss, lse, stats = backends.resolve(backend, hidden.device).selective_loss(problem)
    out = (loss,) + ((lse,) if return_lse else ()) + ((stats,) if return_stats else ())
    return out if len(out) > 1 else loss


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
    targets, ref_loss)``. Per-call tensors (``token_weights``, ``generator``) go to ``forward``.
    """

    def __init__(
        self,
        keep_ratio: float | None = None,
        *,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        scope: str = "batch",
        softcap: float | None = None,
        backend: str = "auto",
        group: torch.distributed.ProcessGroup | None = None,
        selection: str = "topk",
        threshold: float | None = None,
        weighting: str = "hard",
        temperature: float | None = None,
        ref_reduce: str = "mean",
        z_loss: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.keep_ratio = keep_ratio
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.scope = scope
        self.softcap = softcap
        self.backend = backend
        self.group = group
        self.options = dict(
            selection=selection,
            threshold=threshold,
            weighting=weighting,
            temperature=temperature,
            ref_reduce=ref_reduce,
            z_loss=z_loss,
            label_smoothing=label_smoothing,
        )

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ref_loss: Tensor | None = None,
        bias: Tensor | None = None,
        return_stats: bool = False,
        *,
        token_weights: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_lse: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
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
            token_weights=token_weights,
            generator=generator,
            return_lse=return_lse,
            **self.options,
        )

    def extra_repr(self) -> str:
        return (
            f"keep_ratio={self.keep_ratio}, scope={self.scope!r}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}, selection={self.options['selection']!r}, "
            f"weighting={self.options['weighting']!r}"
        )
