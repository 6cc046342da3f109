"""The fused backends as PyTorch custom operators: opaque to torch.compile, differentiable.

A fused backend (`chunked`, `triton`) supplies three plain functions over a `LossProblem`:

    forward(p)  -> (loss, ce, excess, kept, threshold [G], n_kept [G], n_valid [G], aux)
    backward(p, aux, kept, g, needs) -> (d hidden, d weight, d bias), None where not needed
    token_losses(p) -> ce [N]

``aux`` is what its backward needs from its forward (one tensor whose shape the backend names), and
``g`` the upstream gradient of each token's term (`rho_fused.problem.upstream`). `define` registers them as the
operators ``rho_fused::<name>_loss``, ``<name>_loss_backward`` and ``<name>_token_losses``, with
shape functions for tracing and the backward as their autograd formula. Inside an operator the
code runs eagerly, whatever traces around it: torch.compile (``fullgraph=True`` included) sees one
node per call, and the input value checks (`check_values`) still run there, on real tensors.
Autocast is off inside: `rho_fused.loss` has already cast the inputs as ``F.linear`` would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..problem import LossProblem, SelectionStats, make_stats, upstream
from ..validation import check_values

Forward = Callable[[LossProblem], tuple[Tensor, ...]]
Backward = Callable[[LossProblem, Tensor, Tensor, Tensor, tuple[bool, bool, bool]], tuple[Tensor | None, ...]]


def _group_name(p: LossProblem) -> str | None:
    """How the operator names ``p.group``: None for the default group, else its registered name."""
    return None if p.scope != "global" or p.group is None else p.group.group_name


def _problem(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ref_loss: Tensor | None,
    keep_ratio: float,
    ignore_index: int,
    reduction: str,
    scope: str,
    groups: int,
    softcap: float | None,
    group_name: str | None,
) -> LossProblem:
    """The `LossProblem` an operator was called with (flat: ``shape`` is ``[N]``)."""
    group = None
    if group_name is not None:
        group = torch.distributed.distributed_c10d._resolve_process_group(group_name)
    return LossProblem(
        hidden=hidden,
        weight=weight,
        bias=bias,
        targets=targets,
        ref_loss=ref_loss,
        shape=targets.shape,
        scope=scope,
        groups=groups,
        keep_ratio=keep_ratio,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        group=group,
    )


@dataclass(frozen=True)
class FusedBackend:
    """A backend's entry points (`rho_fused.problem` describes them), through its operators."""

    loss_op: Callable
    token_losses_op: Callable

    def selective_loss(self, p: LossProblem) -> tuple[Tensor, SelectionStats]:
        loss, ce, excess, kept, threshold, n_kept, n_valid, _aux = self.loss_op(
            p.hidden,
            p.weight,
            p.bias,
            p.targets,
            p.ref_loss,
            p.keep_ratio,
            p.ignore_index,
            p.reduction,
            p.scope,
            p.groups,
            p.softcap,
            _group_name(p),
        )
        loss = loss.view(p.shape) if p.reduction == "none" else loss
        return loss, make_stats(p, ce, excess, kept, threshold, n_kept, n_valid)

    def token_losses(self, p: LossProblem) -> Tensor:
        return self.token_losses_op(p.hidden, p.weight, p.bias, p.targets, p.ignore_index, p.softcap)


def define(name: str, forward: Forward, backward: Backward, token_losses: Callable, aux_like: Callable) -> FusedBackend:
    """Register backend ``name``'s operators; ``aux_like(hidden) -> Tensor`` gives ``aux``'s shape and dtype."""
    qual = f"rho_fused::{name}"

    @torch.library.custom_op(f"{qual}_loss", mutates_args=())
    def loss_op(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ref_loss: Tensor | None,
        keep_ratio: float,
        ignore_index: int,
        reduction: str,
        scope: str,
        groups: int,
        softcap: float | None,
        group_name: str | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        p = _problem(
            hidden,
            weight,
            bias,
            targets,
            ref_loss,
            keep_ratio,
            ignore_index,
            reduction,
            scope,
            groups,
            softcap,
            group_name,
        )
        check_values(p)
        with torch.autocast(hidden.device.type, enabled=False):
            return tuple(forward(p))

    @loss_op.register_fake
    def _(hidden, weight, bias, targets, ref_loss, keep_ratio, ignore_index, reduction, scope, groups, softcap, _g):
        n, compute = targets.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        return (
            hidden.new_empty(n if reduction == "none" else (), dtype=compute),
            hidden.new_empty(n, dtype=compute),
            hidden.new_empty(n, dtype=compute),
            hidden.new_empty(n, dtype=torch.bool),
            hidden.new_empty(groups, dtype=compute),
            hidden.new_empty(groups, dtype=torch.int64),
            hidden.new_empty(groups, dtype=torch.int64),
            aux_like(hidden),
        )

    @torch.library.custom_op(f"{qual}_loss_backward", mutates_args=())
    def backward_op(
        grad_loss: Tensor,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        aux: Tensor,
        kept: Tensor,
        n_kept: Tensor,
        keep_ratio: float,
        ignore_index: int,
        reduction: str,
        scope: str,
        groups: int,
        softcap: float | None,
        needs: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        p = _problem(
            hidden, weight, bias, targets, None, keep_ratio, ignore_index, reduction, scope, groups, softcap, None
        )
        g = upstream(p, grad_loss, n_kept, p.compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            grads = backward(p, aux, kept, g, (needs[0], needs[1], needs[2] and bias is not None))
        # an operator returns tensors: an empty one stands for "not asked for"
        return tuple(hidden.new_empty(0) if x is None else x for x in grads)

    @backward_op.register_fake
    def _(grad_loss, hidden, weight, bias, targets, aux, kept, n_kept, *scalars_and_needs):
        needs = scalars_and_needs[-1]
        return (
            torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
            torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
            torch.empty_like(bias) if needs[2] and bias is not None else hidden.new_empty(0),
        )

    def setup_context(ctx, inputs, output) -> None:
        hidden, weight, bias, targets, _ref, *scalars, _group = inputs
        ctx.scalars = tuple(scalars)  # keep_ratio, ignore_index, reduction, scope, groups, softcap
        _loss, _ce, _excess, kept, _threshold, n_kept, _n_valid, aux = output
        ctx.save_for_backward(hidden, weight, bias, targets, aux, kept, n_kept)

    def loss_backward(ctx, grad_loss, *_unused):
        hidden, weight, bias, targets, aux, kept, n_kept = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        if grad_loss is None or not any(needs):
            return (None,) * 12
        dh, dw, db = backward_op(grad_loss, hidden, weight, bias, targets, aux, kept, n_kept, *ctx.scalars, needs)
        return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] else None) + (None,) * 9

    loss_op.register_autograd(loss_backward, setup_context=setup_context)

    def no_double_backward(ctx, *_grads):
        # Reached only when a gradient of the gradient is asked for (create_graph=True, then backward).
        raise RuntimeError(
            f"rho_fused: backend {name!r} has no second derivative (double backward, e.g. a gradient"
            " penalty); use backend='reference' for it"
        )

    backward_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)

    @torch.library.custom_op(f"{qual}_token_losses", mutates_args=())
    def token_losses_op(
        hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, softcap: float | None
    ) -> Tensor:
        p = _problem(hidden, weight, bias, targets, None, 1.0, ignore_index, "none", "batch", 1, softcap, None)
        check_values(p)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            return token_losses(p)

    @token_losses_op.register_fake
    def _(hidden, weight, bias, targets, ignore_index, softcap):
        return hidden.new_empty(targets.shape[0], dtype=torch.float32)

    return FusedBackend(loss_op, token_losses_op)
