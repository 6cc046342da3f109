"""The API at its edges: empty inputs, second derivatives, ids outside the vocabulary (issue 12, item 5)."""

from __future__ import annotations

import pytest
import torch

import rho_fused

BACKENDS = ("reference", "chunked", "triton")


def run(backend, device, hidden, weight, targets, ref_loss, bias=None, **options):
    """Loss, stats and every gradient of one call; leaves are fresh copies on ``device``."""
    leaves = [x.detach().clone().to(device).requires_grad_() for x in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().to(device).requires_grad_()
    loss, stats = rho_fused.fused_selective_loss(
        *leaves, targets.to(device), ref_loss.to(device), bias=b, backend=backend, return_stats=True, **options
    )
    # a random per-token upstream gradient for "none", the same in every call
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device)
    grads = torch.autograd.grad(loss, leaves + ([b] if b is not None else []), grad_out, allow_unused=True)
    return loss.cpu(), stats, [g.cpu() for g in grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 0), (3, 0)], ids=["no-sequences", "empty", "empty-rows"])
def test_empty_sequences(backend, reduction, shape, kernel_device):
    """``scope="sequence"`` with zero sequences or zero-length ones: the contract's empty result."""
    device = kernel_device if backend == "triton" else "cpu"
    hidden, weight = torch.randn(*shape, 4), torch.randn(7, 4)
    targets, ref_loss = torch.randint(0, 7, shape), torch.randn(shape)
    loss, stats, (dh, dw) = run(
        backend, device, hidden, weight, targets, ref_loss, scope="sequence", reduction=reduction
    )
    assert loss.shape == (shape if reduction == "none" else ())
    assert float(loss.detach().sum()) == 0.0
    assert stats.threshold.shape == stats.n_kept.shape == stats.n_valid.shape == (shape[0],)
    assert dh.shape == hidden.shape and dw.shape == weight.shape and float(dw.abs().sum()) == 0.0


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_width_hidden(backend, reduction, kernel_device):
    """``D = 0``: the logits are the bias alone; loss and the bias's gradient match the reference."""
    device = kernel_device if backend == "triton" else "cpu"
    hidden, weight, bias = torch.randn(11, 0), torch.randn(7, 0), torch.randn(7)
    targets, ref_loss = torch.randint(0, 7, (11,)), torch.randn(11)
    targets[3] = -100
    want, want_stats, want_grads = run(
        "reference", "cpu", hidden, weight, targets, ref_loss, bias, keep_ratio=0.6, reduction=reduction
    )
    got, got_stats, got_grads = run(
        backend, device, hidden, weight, targets, ref_loss, bias, keep_ratio=0.6, reduction=reduction
    )
    torch.testing.assert_close(got, want)
    assert torch.equal(got_stats.kept.cpu(), want_stats.kept)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


def test_double_backward_of_the_reference_is_torchs():
    """The reference backend is plain torch: a gradient penalty differentiates through it."""
    torch.manual_seed(0)
    hidden, weight = (
        torch.randn(9, 5, dtype=torch.float64, requires_grad=True),
        torch.randn(6, 5, dtype=torch.float64, requires_grad=True),
    )
    targets, ref_loss = torch.randint(0, 6, (9,)), torch.randn(9, dtype=torch.float64)
    kept = rho_fused.fused_selective_loss(
        hidden, weight, targets, ref_loss, keep_ratio=0.5, backend="reference", return_stats=True
    )[1].kept

    def penalty(loss_fn):
        (dh,) = torch.autograd.grad(loss_fn(), hidden, create_graph=True)
        return torch.autograd.grad(dh.pow(2).sum(), weight)[0]

    got = penalty(
        lambda: rho_fused.fused_selective_loss(hidden, weight, targets, ref_loss, keep_ratio=0.5, backend="reference")
    )
    ce = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    want = penalty(lambda: ce.new_zeros(()) + (ce * kept).sum() / kept.sum())
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_double_backward_of_a_fused_backend_is_refused(backend, kernel_device):
    """No silent wrong second derivative: asking for one names the backend and the way out."""
    device = kernel_device if backend == "triton" else "cpu"
    hidden = torch.randn(9, 5, device=device, requires_grad=True)
    weight = torch.randn(6, 5, device=device, requires_grad=True)
    targets, ref_loss = torch.randint(0, 6, (9,), device=device), torch.randn(9, device=device)
    loss = rho_fused.fused_selective_loss(hidden, weight, targets, ref_loss, keep_ratio=0.5, backend=backend)
    (dh,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' has no second derivative.*backend='reference'"):
        dh.pow(2).sum().backward()
    # a plain backward is unaffected
    loss = rho_fused.fused_selective_loss(hidden, weight, targets, ref_loss, keep_ratio=0.5, backend=backend)
    loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("ignore_index", [-100.5, True, "-100"])
def test_ignore_index_must_be_an_integer(ignore_index):
    with pytest.raises(TypeError, match="ignore_index must be an integer, got"):
        rho_fused.fused_selective_loss(
            torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2]), None, ignore_index=ignore_index
        )


def test_causal_lm_loss_checks_input_ids():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=20,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 20, (2, 5))
    for bad in (20, -3):
        ids_bad = ids.clone()
        ids_bad[1, 2] = bad
        with pytest.raises(ValueError, match=rf"input_ids must be in \[0, 20\).*got {bad}"):
            rho_fused.causal_lm_loss(model, ids_bad, ids.clone())
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        rho_fused.causal_lm_loss(model, ids.float(), ids.clone())
