"""The fused backends as PyTorch custom operators: opaque to torch.compile, differentiable.

A fused backend (`chunked`, `triton`) supplies three plain functions over a `LossProblem`:

    forward(p)  -> (loss, ce, excess, kept, threshold [G], n_kept [G], n_valid [G], weight [N],
                    weight_sum [G], lse [N], aux)
    backward(p, lse, aux, rows, g, g_lse, needs) -> (d hidden, d weight, d bias), None where not needed
    token_losses(p) -> ce [N]

``aux`` is what its backward needs from its forward beyond ``lse`` (one tensor whose shape the
backend names). The backward covers the rows of the mask ``rows`` (the kept ones, or every valid
one when ``lse`` has a gradient): ``g`` is the gradient of each token's term ``term_i``, ``[1]``
(common to all rows) or ``[N]`` (0 outside the kept rows), and ``g_lse`` the gradient of ``lse``
(``[N]``) or None, so that ``d z_i = g_i d term_i / d z_i + g_lse_i softmax(z_i)``. `define` registers them as the
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
Backward = Callable[..., tuple[Tensor | None, ...]]

# The scalar options of the loss operator, in its argument order after the tensors.
SCALARS = (
    "keep_ratio", "ignore_index", "reduction", "scope", "groups", "softcap", "ref_reduce", "selection",
    "weighting", "threshold", "temperature", "z_loss", "label_smoothing",
)  # fmt: skip
# The tensors of the loss operator, first.
TENSORS = ("hidden", "weight", "bias", "targets", "ref_loss", "token_weights", "uniform")
OUTPUTS = (
    "loss", "ce", "excess", "kept", "threshold", "n_kept", "n_valid", "weight", "weight_sum", "lse", "aux",
)  # fmt: skip


def _group_name(p: LossProblem) -> str | None:
    """How the operator names ``p.group``: None for the default group, else its registered name."""
    return None if p.scope != "global" or p.group is None else p.group.group_name


def _problem(group_name: str | None, **fields) -> LossProblem:
    """The `LossProblem` an operator was called with (flat: ``shape`` is ``[N]``)."""
    group = None
    if group_name is not None:
        group = torch.distributed.distributed_c10d._resolve_process_group(group_name)
    return LossProblem(shape=fields["targets"].shape, group=group, **fields)


def _args(p: LossProblem) -> tuple:
    """The loss operator's arguments for ``p``: `TENSORS`, `SCALARS`, then the group's name."""
    return (*(getattr(p, k) for k in TENSORS), *(getattr(p, k) for k in SCALARS), _group_name(p))


@dataclass(frozen=True)
class FusedBackend:
    """A backend's entry points (`rho_fused.problem` describes them), through its operators."""

    loss_op: Callable
    token_losses_op: Callable
    single_pass_op: Callable | None = None
    single_pass_applies: Callable[[LossProblem], bool] | None = None

    def selective_loss(self, p: LossProblem) -> tuple[Tensor, Tensor, SelectionStats]:
        needs = [t is not None and t.requires_grad for t in (p.hidden, p.weight, p.bias)]
        one_pass = (
            self.single_pass_op is not None
            and torch.is_grad_enabled()
            and any(needs)
            and not torch.compiler.is_compiling()
            and self.single_pass_applies(p)
        )
        outputs = self.single_pass_op(*_args(p), needs)[: len(OUTPUTS)] if one_pass else self.loss_op(*_args(p))
        out = dict(zip(OUTPUTS, outputs, strict=True))
        loss = out["loss"].view(p.shape) if p.reduction == "none" else out["loss"]
        names = ("ce", "excess", "kept", "threshold", "n_kept", "n_valid", "lse", "weight", "weight_sum")
        stats = make_stats(p, *(out[k] for k in names))
        return loss, out["lse"].view(p.shape), stats

    def token_losses(self, p: LossProblem) -> Tensor:
        return self.token_losses_op(p.hidden, p.weight, p.bias, p.targets, p.ignore_index, p.softcap)


def define(
    name: str,
    forward: Forward,
    backward: Backward,
    token_losses: Callable,
    aux_like: Callable,
    single_pass: tuple[Callable[[LossProblem], bool], Callable[..., tuple[Tensor, ...]]] | None = None,
) -> FusedBackend:
    """Register backend ``name``'s operators; ``aux_like(hidden) -> Tensor`` gives ``aux``'s shape and dtype.

    ``single_pass = (applies, forward_and_grads)``: where ``applies(p)`` and a gradient is needed,
    ``forward_and_grads(p, needs)`` gives `forward`'s outputs and the gradients for an upstream
    gradient of 1, which the backward scales (operator ``rho_fused::<name>_loss_single_pass``).
    """
    qual = f"rho_fused::{name}"

    @torch.library.custom_op(f"{qual}_loss", mutates_args=())
    def loss_op(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ref_loss: Tensor | None,
        token_weights: Tensor | None,
        uniform: Tensor | None,
        keep_ratio: float,
        ignore_index: int,
        reduction: str,
        scope: str,
        groups: int,
        softcap: float | None,
        ref_reduce: str,
        selection: str,
        weighting: str,
        threshold: float,
        temperature: float,
        z_loss: float,
        label_smoothing: float,
        group_name: str | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        args = locals()
        p = _problem(group_name, **{k: args[k] for k in TENSORS + SCALARS})
        check_values(p)
        with torch.autocast(hidden.device.type, enabled=False):
            return tuple(forward(p))

    @loss_op.register_fake
    def loss_fake(hidden, weight, bias, targets, ref_loss, token_weights, uniform, keep_ratio, ignore_index,
                  reduction, scope, groups, *_rest):  # fmt: skip
        n, compute = targets.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        return (
            hidden.new_empty(n if reduction == "none" else (), dtype=compute),  # loss
            hidden.new_empty(n, dtype=compute),  # ce
            hidden.new_empty(n, dtype=compute),  # excess
            hidden.new_empty(n, dtype=torch.bool),  # kept
            hidden.new_empty(groups, dtype=compute),  # threshold
            hidden.new_empty(groups, dtype=torch.int64),  # n_kept
            hidden.new_empty(groups, dtype=torch.int64),  # n_valid
            hidden.new_empty(n, dtype=compute),  # weight
            hidden.new_empty(groups, dtype=compute),  # weight_sum
            hidden.new_empty(n, dtype=compute),  # lse
            aux_like(hidden),
        )

    @torch.library.custom_op(f"{qual}_loss_backward", mutates_args=())
    def backward_op(
        grad_loss: Tensor | None,
        grad_lse: Tensor | None,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        lse: Tensor,
        aux: Tensor,
        kept: Tensor,
        token_weight: Tensor,
        weight_sum: Tensor,
        weighted: bool,
        keep_ratio: float,
        ignore_index: int,
        reduction: str,
        scope: str,
        groups: int,
        softcap: float | None,
        ref_reduce: str,
        selection: str,
        weighting: str,
        threshold: float,
        temperature: float,
        z_loss: float,
        label_smoothing: float,
        needs: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        args = locals()
        tensors = dict(hidden=hidden, weight=weight, bias=bias, targets=targets, ref_loss=None)
        p = _problem(None, **tensors, token_weights=None, uniform=None, **{k: args[k] for k in SCALARS})
        dtype = p.compute_dtype
        if grad_loss is None:
            g = hidden.new_zeros(1, dtype=dtype)
        else:
            g = upstream(p, grad_loss, weight_sum, dtype)
            if weighted:  # d loss / d term_i = upstream * W_i (W_i = 0 outside the kept rows)
                g = g * token_weight
        rows = kept
        g_lse = None
        if grad_lse is not None:  # every valid row's lse has a gradient: those rows too
            rows = p.valid
            g = torch.where(kept, g, torch.zeros_like(g)).expand(kept.shape[0]).contiguous()
            g_lse = torch.where(rows, grad_lse.reshape(-1).to(dtype), 0)
        with torch.autocast(hidden.device.type, enabled=False):
            grads = backward(p, lse, aux, rows, g, g_lse, (needs[0], needs[1], needs[2] and bias is not None))
        # an operator returns tensors: an empty one stands for "not asked for"
        return tuple(hidden.new_empty(0) if x is None else x for x in grads)

    @backward_op.register_fake
    def _(grad_loss, grad_lse, hidden, weight, bias, *rest):
        needs = rest[-1]
        return (
            torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
            torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
            torch.empty_like(bias) if needs[2] and bias is not None else hidden.new_empty(0),
        )

    def setup_context(ctx, inputs, output) -> None:
        args = dict(zip(TENSORS + SCALARS, inputs, strict=False))
        weighted = args["weighting"] == "soft" or args["token_weights"] is not None
        ctx.scalars = (weighted, *(args[k] for k in SCALARS))
        out = dict(zip(OUTPUTS, output, strict=True))
        ctx.set_materialize_grads(False)  # an output without a gradient (lse, mostly) comes as None
        ctx.save_for_backward(
            args["hidden"], args["weight"], args["bias"], args["targets"],
            out["lse"], out["aux"], out["kept"], out["weight"], out["weight_sum"],
        )  # fmt: skip

    def loss_backward(ctx, *grads):
        grad = dict(zip(OUTPUTS, grads, strict=True))
        hidden, weight, bias, targets, lse, aux, kept, token_weight, weight_sum = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        none = (None,) * (len(TENSORS) + len(SCALARS) + 1)
        if (grad["loss"] is None and grad["lse"] is None) or not any(needs):
            return none
        dh, dw, db = backward_op(
            grad["loss"], grad["lse"], hidden, weight, bias, targets, lse, aux, kept, token_weight, weight_sum,
            *ctx.scalars, needs,
        )  # fmt: skip
        return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] else None) + none[3:]

    loss_op.register_autograd(loss_backward, setup_context=setup_context)

    if single_pass is None:
        return_single = None
    else:
        applies, forward_and_grads = single_pass

        @torch.library.custom_op(f"{qual}_loss_single_pass", mutates_args=())
        def single_pass_op(
            hidden: Tensor,
            weight: Tensor,
            bias: Tensor | None,
            targets: Tensor,
            ref_loss: Tensor | None,
            token_weights: Tensor | None,
            uniform: Tensor | None,
            keep_ratio: float,
            ignore_index: int,
            reduction: str,
            scope: str,
            groups: int,
            softcap: float | None,
            ref_reduce: str,
            selection: str,
            weighting: str,
            threshold: float,
            temperature: float,
            z_loss: float,
            label_smoothing: float,
            group_name: str | None,
            needs: list[bool],
        ) -> tuple[  # OUTPUTS, then d hidden, d weight, d bias
            Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
            Tensor, Tensor, Tensor,
        ]:  # fmt: skip
            args = locals()
            p = _problem(group_name, **{k: args[k] for k in TENSORS + SCALARS})
            check_values(p)
            with torch.autocast(hidden.device.type, enabled=False):
                out = forward_and_grads(p, (needs[0], needs[1], needs[2] and bias is not None))
            return tuple(hidden.new_empty(0) if x is None else x for x in out)

        @single_pass_op.register_fake
        def _(*args):
            hidden, weight, bias, needs = args[0], args[1], args[2], args[-1]
            grads = (
                torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
                torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
                torch.empty_like(bias) if needs[2] and bias is not None else hidden.new_empty(0),
            )
            return (*loss_fake(*args[:-1]), *grads)

        def single_pass_setup(ctx, inputs, output) -> None:
            setup_context(ctx, inputs[:-1], output[: len(OUTPUTS)])
            ctx.grads = output[len(OUTPUTS) :]  # for an upstream gradient of 1; used once

        def single_pass_backward(ctx, *grads):
            grad_loss, grad_lse = grads[0], grads[OUTPUTS.index("lse")]
            if grad_loss is None or grad_lse is not None or ctx.grads is None:
                # lse has a gradient too, or a second backward (retain_graph): the two-pass backward
                return (*loss_backward(ctx, *grads[: len(OUTPUTS)]), None)
            dh, dw, db = ctx.grads
            ctx.grads = None
            needs = ctx.needs_input_grad[:3]
            scaled = [x.mul_(grad_loss.to(x.dtype)) if y else None for x, y in zip((dh, dw, db), needs, strict=True)]
            return (*scaled, *(None,) * (len(TENSORS) + len(SCALARS) + 1 - 3), None)

        single_pass_op.register_autograd(single_pass_backward, setup_context=single_pass_setup)
        return_single = single_pass_op

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
        p = LossProblem(
            hidden=hidden, weight=weight, bias=bias, targets=targets, ref_loss=None, shape=targets.shape,
            scope="batch", groups=1, keep_ratio=1.0, ignore_index=ignore_index, reduction="none", softcap=softcap,
        )  # fmt: skip
        check_values(p)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            return token_losses(p)

    @token_losses_op.register_fake
    def _(hidden, weight, bias, targets, ignore_index, softcap):
        return hidden.new_empty(targets.shape[0], dtype=torch.float32)

    return FusedBackend(loss_op, token_losses_op, return_single, None if single_pass is None else single_pass[0])
