"""Property-based: random shapes, ratios and options, chunked against the reference."""

from __future__ import annotations

import torch
from cases import assert_parity, make_case, run
from hypothesis import given, settings
from hypothesis import strategies as st

import rho_fused
from rho_fused.backends import chunked


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 23),
    dim=st.integers(1, 33),
    vocab=st.integers(1, 70),
    keep_ratio=st.floats(0.001, 1.0),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    scope=st.sampled_from(["batch", "sequence"]),
    bias=st.booleans(),
    softcap=st.sampled_from([None, 0.5, 30.0]),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    ref=st.sampled_from(["spaced", "none"]),
    chunk=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_reference(
    batch, length, dim, vocab, keep_ratio, reduction, scope, bias, softcap, ignore_frac, ref, chunk, seed
):
    case = make_case(
        (batch, length), dim, vocab, seed=seed, bias=bias, ignore_frac=ignore_frac, ref=ref, softcap=softcap
    )
    budgets = chunked.FORWARD_BUDGET_BYTES, chunked.BACKWARD_BUDGET_BYTES, chunked.MIN_TILE_COLS
    chunked.FORWARD_BUDGET_BYTES = chunk * vocab * 4 * 2
    chunked.BACKWARD_BUDGET_BYTES = chunk * 6 * dim * 4  # blocks of a few kept rows
    chunked.MIN_TILE_COLS = 8
    try:
        stats = assert_parity(
            case, "chunked", torch.float32, keep_ratio=keep_ratio, reduction=reduction, scope=scope, softcap=softcap
        )
    finally:
        chunked.FORWARD_BUDGET_BYTES, chunked.BACKWARD_BUDGET_BYTES, chunked.MIN_TILE_COLS = budgets
    assert stats.kept.sum() == stats.n_kept.sum() <= stats.n_valid.sum()


def test_strided_inputs_equal_contiguous():
    """Non-contiguous views give the results, and gradients, of their contiguous copies."""
    case = make_case((6, 11), 24, 50, bias=True, ref="random", seed=2)
    wide = torch.randn(50, 48)
    wide[:, ::2] = case.weight.detach()
    weight = wide[:, ::2].requires_grad_()  # stride 2 along D
    hidden = (
        case.hidden.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    )  # [B, T] strides swapped
    targets = case.targets.t().contiguous().t()
    ref = case.ref_loss.t().contiguous().t()
    assert not (weight.is_contiguous() or hidden.is_contiguous() or targets.is_contiguous())
    for backend in ("chunked", "reference"):
        loss = rho_fused.fused_selective_loss(hidden, weight, targets, ref, bias=case.bias, backend=backend)
        dh, dw = torch.autograd.grad(loss, [hidden, weight])
        expected, (eh, ew, _), _ = run(case, backend)
        torch.testing.assert_close(loss.detach(), expected)
        torch.testing.assert_close(dh, eh)
        torch.testing.assert_close(dw, ew)
