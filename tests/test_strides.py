"""Any strides, every backend: strided, expanded and transposed views of every input give the
results of their contiguous copies: the same kept set, loss and gradients of the leaves."""

from __future__ import annotations

import pytest
import torch
from cases import IGNORE, KERNEL_DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st

import rho_fused

BACKENDS = ["reference", "chunked", "triton"]
HIDDEN_KINDS = ["contiguous", "slice", "transpose", "expand"]


def view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values as a view of kind ``kind`` (``"contiguous"``: ``t`` itself).

    ``slice``: every other element of a twice-as-long last dimension (stride 2); ``transpose``:
    stored with its first two dimensions swapped; ``expand``: the first row (first element of a
    vector) repeated with stride 0.
    """
    if kind == "contiguous":
        return t
    if kind == "slice":
        return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]
    if kind == "transpose":
        return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t.flip(0).contiguous().flip(0)
    if kind == "expand":
        return t[:1].expand(t.shape)
    raise ValueError(kind)


def run(backend: str, inputs: dict, kinds: dict, contiguous: bool, **options):
    """Loss, kept mask and leaf gradients, the inputs passed as views (or their contiguous copies)."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    leaves = {k: inputs[k].to(device).requires_grad_() for k in ("hidden", "weight", "bias")}
    args = {k: view(leaves.get(k, inputs[k].to(device)), kinds[k]) for k in inputs}
    if contiguous:
        args = {k: v.contiguous() for k, v in args.items()}
    else:
        assert all(not v.is_contiguous() for k, v in args.items() if kinds[k] != "contiguous")
    loss, stats = rho_fused.fused_selective_loss(
        args["hidden"], args["weight"], args["targets"], args["ref_loss"], bias=args["bias"], backend=backend,
        return_stats=True, **options,
    )  # fmt: skip
    upstream = torch.linspace(-1, 1, loss.numel(), device=device).reshape(loss.shape)
    grads = torch.autograd.grad(loss, list(leaves.values()), upstream)
    return loss.detach().cpu(), stats.kept.cpu(), [g.cpu() for g in grads]


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, deadline=None)
@given(
    hidden=st.sampled_from(HIDDEN_KINDS),
    weight=st.sampled_from(["contiguous", "slice", "transpose"]),
    bias=st.sampled_from(["contiguous", "slice", "expand"]),
    targets=st.sampled_from(HIDDEN_KINDS),
    ref_loss=st.sampled_from(HIDDEN_KINDS),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    scope=st.sampled_from(["batch", "sequence"]),
    seed=st.integers(0, 2**16),
)
def test_views_equal_contiguous_copies(backend, hidden, weight, bias, targets, ref_loss, reduction, scope, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length, dim, vocab = 3, 9, 20, 45
    y = torch.randint(0, vocab, (batch, length), generator=gen)
    y[torch.rand(batch, length, generator=gen) < 0.25] = IGNORE
    y[0, 0] = 1  # at least one valid token whatever the view
    inputs = {
        "hidden": torch.randn(batch, length, dim, generator=gen),
        "weight": torch.randn(vocab, dim, generator=gen) / dim**0.5,
        "bias": torch.randn(vocab, generator=gen),
        "targets": y,
        "ref_loss": torch.rand(batch, length, generator=gen) * 4,
    }
    kinds = {"hidden": hidden, "weight": weight, "bias": bias, "targets": targets, "ref_loss": ref_loss}
    options = dict(keep_ratio=0.6, reduction=reduction, scope=scope)
    loss, kept, grads = run(backend, inputs, kinds, contiguous=False, **options)
    expected_loss, expected_kept, expected_grads = run("reference", inputs, kinds, contiguous=True, **options)
    assert torch.equal(kept, expected_kept)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for name, g, e in zip(("hidden", "weight", "bias"), grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d {n}: {m}")


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_targets_and_expanded_reference_loss(backend):
    """The triton backend once read these wrong: targets ``y[:, ::2]`` and ``ref_loss`` ``r.expand(...)``."""
    gen = torch.Generator().manual_seed(7)
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    hidden = torch.randn(4, 8, 16, generator=gen).to(device)
    weight = torch.randn(40, 16, generator=gen).to(device)
    y = torch.randint(0, 40, (4, 16), generator=gen).to(device)[:, ::2]
    r = torch.tensor(1.5, device=device).expand(4, 8)
    loss = rho_fused.fused_selective_loss(hidden, weight, y, r, backend=backend)
    expected = rho_fused.fused_selective_loss(hidden, weight, y.contiguous(), r.contiguous(), backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
