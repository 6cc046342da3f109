"""Shared builders for parity tests: random loss inputs, the fp64 truth, and PyTorch as users write it.

Parity rule: a backend's result in a dtype is no further from the fp64 truth than plain PyTorch
in that dtype, plus a small tolerance, and close to the reference backend in the same dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from torch import Tensor

import rho_fused

IGNORE = -100

# "A small tolerance" beyond PyTorch's own error, relative to the largest value of the truth.
EXTRA_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-3, torch.float16: 1e-3}


@dataclass(frozen=True)
class Case:
    """Inputs of one loss call; ``upstream`` is the random per-token gradient for ``reduction='none'``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    ref_loss: Tensor | None
    upstream: Tensor

    def to(self, dtype: torch.dtype) -> Case:
        """The same values (rounded once to ``dtype``) as fresh leaves."""

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(dtype).requires_grad_(True)

        return replace(self, hidden=cast(self.hidden), weight=cast(self.weight), bias=cast(self.bias))

    def on(self, device: str) -> Case:
        """The same values on ``device``, as fresh leaves."""

        def move(t: Tensor | None, leaf: bool) -> Tensor | None:
            return None if t is None else t.detach().to(device).requires_grad_(leaf)

        return Case(
            move(self.hidden, True), move(self.weight, True), move(self.bias, True), move(self.targets, False),
            move(self.ref_loss, False), move(self.upstream, False),
        )  # fmt: skip


def make_case(
    shape: tuple[int, ...],
    dim: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    bias: bool = False,
    ignore_frac: float = 0.25,
    ref: str = "spaced",
    softcap: float | None = None,
) -> Case:
    """Random inputs with ``ignore_frac`` of tokens ignored.

    ``ref="spaced"`` sets ``ref_loss = ce_truth - e`` with ``e`` a random permutation of
    multiples of 0.5, so the excess of valid tokens is well separated and the kept set cannot
    flip under rounding; ``ref="random"`` draws it uniformly; ``ref="none"`` gives None.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * (2.0 / math.sqrt(dim))
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    upstream = torch.randn(shape, generator=g)
    case = Case(hidden, weight, b, targets, None, upstream).to(dtype)
    if ref == "random":
        case = replace(case, ref_loss=torch.rand(shape, generator=g) * 5)
    elif ref == "spaced":
        ce = rho_fused.token_losses(
            case.hidden.double(), case.weight.double(), targets, bias=None if b is None else case.bias.double(),
            softcap=softcap, backend="reference",
        )  # fmt: skip
        spacing = torch.randperm(targets.numel(), generator=g).reshape(shape).double() * 0.5
        case = replace(case, ref_loss=(ce - spacing).float())
    elif ref != "none":
        raise ValueError(ref)
    return case


def _call_options(options: dict, device: str) -> dict:
    """The loss options for a call on ``device``: ``generator`` given as a seed becomes a fresh
    generator of that seed on ``device`` (every backend then draws the same U), tensors move there."""
    out = dict(options)
    if "generator" in out:
        out["generator"] = torch.Generator(device=device).manual_seed(out["generator"])
    if out.get("token_weights") is not None:
        out["token_weights"] = out["token_weights"].to(device)
    return out


def run(
    case: Case, backend: str, **options
) -> tuple[Tensor | list[Tensor], list[Tensor | None], rho_fused.SelectionStats]:
    """The loss (``[loss, lse]`` with ``return_lse``), gradients ``[d hidden, d weight, d bias]``
    and stats of one backend on ``case``, on the case's device.

    The triton backend runs on ``KERNEL_DEVICE``: the GPU where there is one, else the interpreter;
    so does every backend of a sampled selection (the same generator must draw the same U).
    The gradients are those of the loss (times the case's per-token upstream under ``none``) plus,
    with ``return_lse``, ``lse`` times the flipped upstream.
    """
    sampled = options.get("selection") == "sample"
    device = KERNEL_DEVICE if backend == "triton" or sampled else case.hidden.device.type
    on = case if device == case.hidden.device.type else case.on(device)
    out = rho_fused.fused_selective_loss(
        on.hidden, on.weight, on.targets, on.ref_loss, bias=on.bias, backend=backend, return_stats=True,
        **_call_options(options, device),
    )  # fmt: skip
    outputs, stats = list(out[:-1]), out[-1]
    grads = _grads(on, outputs, options.get("reduction", "mean"))
    outputs = [o.detach() for o in outputs]
    if on is not case:  # back where the case lives (a copy to the host would synchronise for nothing)
        outputs = [o.cpu() for o in outputs]
        stats = rho_fused.SelectionStats(**{k: None if v is None else v.cpu() for k, v in vars(stats).items()})
        grads = [None if g is None else g.cpu() for g in grads]
    return (outputs[0] if len(outputs) == 1 else outputs), grads, stats


def naive_pytorch(
    case: Case, kept: Tensor | rho_fused.SelectionStats, **options
) -> tuple[Tensor | list[Tensor], list[Tensor | None]]:
    """SLM as users write it, entirely in the case's dtype: full logits, torch's cross-entropy (with
    its label smoothing), z-loss on torch's logsumexp, the given kept tokens (a mask, or the stats of
    a run: its kept mask and weights). Returns the loss (``[loss, lse]`` with ``return_lse``) and
    the gradients, as `run` does."""
    z = case.hidden @ case.weight.T
    if case.bias is not None:
        z = z + case.bias
    cap = options.get("softcap")
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    safe = torch.where(case.targets == IGNORE, 0, case.targets)
    eps = options.get("label_smoothing", 0.0)
    ce = F.cross_entropy(z.flatten(0, -2), safe.flatten(), reduction="none", label_smoothing=eps)
    ce = ce.view(case.targets.shape)
    lse = torch.logsumexp(z, dim=-1)
    if options.get("z_loss"):
        ce = ce + options["z_loss"] * lse.square()
    mask = kept if isinstance(kept, Tensor) else kept.kept
    weight = mask if isinstance(kept, Tensor) else kept.weight
    weight = weight.to(device=ce.device, dtype=ce.dtype)
    per_token = torch.where(mask.to(ce.device), ce * weight, 0.0)
    reduction = options.get("reduction", "mean")
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
    outputs = [loss]
    if options.get("return_lse"):
        outputs.append(torch.where(case.targets == IGNORE, 0.0, lse))
    grads = _grads(case, outputs, reduction)
    return (outputs[0].detach() if len(outputs) == 1 else [o.detach() for o in outputs]), grads


def _grads(case: Case, outputs: list[Tensor], reduction: str) -> list[Tensor | None]:
    inputs = [t for t in (case.hidden, case.weight, case.bias) if t is not None]
    loss = outputs[0]
    upstream = [case.upstream.to(loss.dtype) if reduction == "none" else torch.ones_like(loss)]
    if len(outputs) > 1:  # lse, differentiable
        upstream.append(case.upstream.flip(-1).to(outputs[1].dtype))
    grads = torch.autograd.grad(outputs, inputs, grad_outputs=upstream, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads, strict=True)]
    return grads + [None] * (3 - len(grads))


def _listed(result: tuple) -> tuple:
    """`run`'s result with its outputs always a list."""
    out, grads, stats = result
    return ([out] if isinstance(out, Tensor) else out), grads, stats


def max_err(a: Tensor, truth: Tensor) -> float:
    return (a.double() - truth.double()).abs().max().item() if truth.numel() else 0.0


def assert_parity(case: Case, backend: str, dtype: torch.dtype, **options) -> rho_fused.SelectionStats:
    """``backend`` in ``dtype`` against the fp64 truth, PyTorch in ``dtype``, and the reference in ``dtype``."""
    low = case.to(dtype)
    # The truth of the inputs this dtype can hold: rounding the inputs is not the backend's error.
    truth_out, truth_grads, truth_stats = _listed(run(low.to(torch.float64), "reference", **options))
    out, grads, stats = _listed(run(low, backend, **options))
    ref_out, ref_grads, ref_stats = _listed(run(low, "reference", **options))
    torch_out, torch_grads, _ = _listed((*naive_pytorch(low, truth_stats, **options), None))

    assert torch.equal(stats.kept, truth_stats.kept), "kept set differs from the fp64 truth's"
    assert torch.equal(stats.kept, ref_stats.kept)
    assert torch.equal(stats.n_kept, truth_stats.n_kept) and torch.equal(stats.n_valid, truth_stats.n_valid)
    # the weights are constants of the excess: within its rounding of the truth's (soft weights'
    # slope is at most 1 / (4 temperature))
    weight_tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(stats.weight.double(), truth_stats.weight, rtol=weight_tol, atol=weight_tol)
    names = ["loss", "lse"][: len(out)] + ["d hidden", "d weight", "d bias"]
    for name, ours, ref, pt, truth in zip(
        names, [*out, *grads], [*ref_out, *ref_grads], [*torch_out, *torch_grads], [*truth_out, *truth_grads],
        strict=True,
    ):  # fmt: skip
        if truth is None:
            assert ours is None or not ours.any(), name
            continue
        assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
        assert torch.isfinite(ours).all(), f"{name} has NaN or inf"
        scale = truth.abs().max().item() if truth.numel() else 0.0
        # PyTorch in this dtype two ways (the user's 3-D matmul, and the reference backend's flat
        # one, fp32 logits): which GEMM rounding lands nearer the truth varies, hold us to the further.
        budget = max(max_err(pt, truth), max_err(ref, truth)) + EXTRA_TOL[dtype] * max(scale, 1e-3)
        err = max_err(ours, truth)
        assert err <= budget, f"{name}: error {err:.3g} vs fp64 truth exceeds PyTorch {dtype}'s {budget:.3g}"
        # Same inputs, both accumulating in fp32: at most one rounding of the output apart, unless
        # nearer the truth than the reference (tiny gradients that are sums of cancelling terms
        # carry the roundings of the terms, which can exceed one of the output).
        eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
        near_ref = max_err(ours, ref) <= 2 * eps * max(scale, 1e-3)
        assert near_ref or err <= max_err(ref, truth), f"{name}: differs from the reference backend"
    return stats
