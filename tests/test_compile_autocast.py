"""torch.compile and torch.autocast around the loss, on every backend.

Compiled (inductor) steps equal eager ones; the fused backends trace with ``fullgraph=True`` (each
is one custom operator in the graph), and their input value checks still run. Under autocast the
loss is computed as on inputs cast to the autocast dtype, as ``F.linear`` would be, and gradients
come back in the leaves' dtypes.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tr
from cases import KERNEL_DEVICE, make_case

import rho_fused
from rho_fused.hf import causal_lm_loss

BACKENDS = ["reference", "chunked", "triton"]


def _inputs(backend: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    case = make_case((3, 10), 24, 70, seed=seed, bias=True, dtype=dtype)
    return case.on(KERNEL_DEVICE if backend == "triton" else "cpu")


def _loss_and_grads(fn, case, autocast: torch.dtype | None = None, **options):
    """Loss and gradients; the forward under ``torch.autocast(dtype=autocast)`` if given (the
    backward outside it, as autocast's documentation asks)."""
    device = case.hidden.device.type
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = fn(case.hidden, case.weight, case.targets, case.ref_loss, case.bias, **options)
    upstream = case.upstream if loss.dim() else None
    grads = torch.autograd.grad(loss, [case.hidden, case.weight, case.bias], upstream)
    return loss.detach(), grads


def _slm(hidden, weight, targets, ref_loss, bias, **options):
    return rho_fused.fused_selective_loss(hidden, weight, targets, ref_loss, bias=bias, keep_ratio=0.6, **options)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_loss_equals_eager(backend, reduction):
    torch._dynamo.reset()
    case = _inputs(backend, seed=1)
    options = dict(backend=backend, reduction=reduction, scope="sequence")
    # the reference backend reads its selection on the host (Python sorting): graph breaks there
    compiled = torch.compile(_slm, backend="inductor", fullgraph=backend != "reference")
    loss, grads = _loss_and_grads(compiled, case, **options)
    eager_loss, eager_grads = _loss_and_grads(_slm, _inputs(backend, seed=1), **options)
    # the fused backends run the same operators compiled or not: bitwise equal; inductor re-fuses
    # the reference's elementwise ops, an ulp or so apart
    tol = dict(rtol=1e-6, atol=1e-6) if backend == "reference" else dict(rtol=0, atol=0)
    torch.testing.assert_close(loss, eager_loss, **tol)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, **tol)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_compiled_variants_equal_eager(backend):
    """Threshold selection, token weights, two references, z-loss, smoothing and a differentiable
    lse: one operator under fullgraph, bitwise equal to eager (aot_eager: dynamo and AOT autograd
    trace the call, no inductor fusion of the ops around it)."""
    torch._dynamo.reset()

    def fn(hidden, weight, targets, ref_loss, bias, token_weights):
        refs = torch.stack([ref_loss, ref_loss * 0.5])
        loss, lse = rho_fused.fused_selective_loss(
            hidden, weight, targets, refs, bias=bias, backend=backend, selection="threshold", threshold=0.5,
            token_weights=token_weights, ref_reduce="min", z_loss=1e-2, label_smoothing=0.1, return_lse=True,
            scope="sequence",
        )  # fmt: skip
        return loss + (lse * lse.detach().cos()).sum()

    results = []
    for f in (torch.compile(fn, fullgraph=True, backend="aot_eager"), fn):
        case = _inputs(backend, seed=6)
        w = torch.rand(case.targets.shape, generator=torch.Generator().manual_seed(1)).to(case.hidden.device)
        out = f(case.hidden, case.weight, case.targets, case.ref_loss, case.bias, w)
        results.append([out.detach(), *torch.autograd.grad(out, [case.hidden, case.weight, case.bias])])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_value_checks_run_under_compile(backend):
    torch._dynamo.reset()
    case = _inputs(backend)
    targets = case.targets.clone()
    targets[0, 3] = 70  # V = 70: out of range
    compiled = torch.compile(_slm, fullgraph=True)
    with pytest.raises(ValueError, match=r"targets must be in \[0, V\) = \[0, 70\).* got 70 at flattened position 3"):
        compiled(case.hidden, case.weight, targets, case.ref_loss, case.bias, backend=backend)


def _tiny_llama() -> tr.PreTrainedModel:
    torch.manual_seed(0)
    config = tr.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return tr.LlamaForCausalLM(config)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_compiled_causal_lm_loss_equals_eager(backend):
    """A compiled training step of a Hugging Face model through `causal_lm_loss`."""
    torch._dynamo.reset()
    model = _tiny_llama()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2, 12), generator=gen)
    labels = ids.clone()
    labels[1, :3] = -100
    ref = torch.rand(2, 12, generator=gen) * 4

    def step(m):
        return causal_lm_loss(m, ids, labels, ref_loss=ref, keep_ratio=0.6, backend=backend)

    eager = step(model)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(step)(model)
    grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_autocast_computes_as_on_cast_inputs(backend, reduction):
    """fp32 leaves under autocast(bf16) give the loss of their bf16 casts, gradients in fp32."""
    case = _inputs(backend, seed=2)
    loss, grads = _loss_and_grads(_slm, case, torch.bfloat16, backend=backend, reduction=reduction)
    low = case.to(torch.bfloat16)
    expected, expected_grads = _loss_and_grads(_slm, low, backend=backend, reduction=reduction)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for g, e in zip(grads, expected_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e.float(), rtol=0, atol=0)
    # and not the fp32 loss it used to equal
    assert not torch.equal(loss, _loss_and_grads(_slm, case, backend=backend, reduction=reduction)[0])


def test_autocast_leaves_fp64_alone():
    case = _inputs("chunked", seed=4, dtype=torch.float64)
    loss, grads = _loss_and_grads(_slm, case, torch.bfloat16, backend="chunked")
    expected, _ = _loss_and_grads(_slm, case, backend="chunked")
    assert loss.dtype == torch.float64 and grads[0].dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scope,reduction,variant", [("batch", "mean", False), ("sequence", "none", True)])
def test_operators_pass_opcheck(backend, dtype, scope, reduction, variant):
    """``torch.library.opcheck``: the shape functions (what torch.compile traces with) give the real
    outputs' shapes and dtypes, the schema is right, and autograd is registered as it should be
    (``variant``: threshold selection, token weights, two references, z-loss and smoothing)."""
    rho_fused.backends.resolve(backend, torch.device("cpu"))  # the operators exist once imported
    case = _inputs(backend, seed=5, dtype=dtype)
    y, r = case.targets.reshape(-1), case.ref_loss.reshape(-1)
    h = case.hidden.detach().reshape(-1, case.hidden.shape[-1]).requires_grad_()
    tensors = (h, case.weight, case.bias, y, r, None, None)
    options = ("mean", "topk", "hard", 0.0, 1.0, 0.0, 0.0)
    if variant:
        tensors = (h, case.weight, case.bias, y, torch.stack([r, r + 1]), torch.rand_like(r), None)
        options = ("max", "threshold", "hard", 0.5, 1.0, 1e-2, 0.1)
    groups = 3 if scope == "sequence" else 1
    args = (*tensors, 0.6, -100, reduction, scope, groups, None, *options, None)
    torch.library.opcheck(getattr(torch.ops.rho_fused, f"{backend}_loss").default, args)
    torch.library.opcheck(
        getattr(torch.ops.rho_fused, f"{backend}_token_losses").default,
        (h.detach(), case.weight.detach(), None, y, -100, 2.0),
    )
