"""The triton backend (kernels under TRITON_INTERPRET=1 on CPU) against the reference and the fp64 truth.

Every parity check goes through `cases.assert_parity`: identical kept set, counts and threshold
source, and loss and every gradient no further from the fp64 truth than PyTorch in the same dtype
plus a small tolerance, and within two roundings of the reference backend. Shapes are small and odd
(65 tokens, D=24 or 40, V=97) against 16/32 tiles, so every tile loop ends in a partial tile.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from cases import IGNORE, KERNEL_DEVICE, Case, assert_parity, make_case, run
from rho_fused.kernels import backward as backward_kernel
from rho_fused.kernels import forward as forward_kernel
from rho_fused.kernels.plan import backward_plan, forward_plan

import rho_fused
from rho_fused.backends import triton as triton_backend
from rho_fused.validation import make_problem

pytestmark = pytest.mark.usefixtures("small_blocks")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _seed(*parts: object) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dtypes_and_reductions(dtype, reduction):
    # reduction="none" backpropagates the case's random per-token upstream gradient
    case = make_case((5, 13), 24, 97, seed=_seed(dtype, reduction), bias=True)
    assert_parity(case, "triton", dtype, keep_ratio=0.6, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.6, 0.01])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 4.0)])
def test_scopes_ratios_bias_softcap(dtype, scope, keep_ratio, bias, softcap):
    reduction = "none" if keep_ratio == 0.6 else "mean"
    case = make_case((5, 13), 24, 97, seed=_seed(scope, keep_ratio, bias, softcap), bias=bias, softcap=softcap)
    stats = assert_parity(
        case, "triton", dtype, keep_ratio=keep_ratio, reduction=reduction, scope=scope, softcap=softcap
    )
    if keep_ratio == 0.01:  # a single token per group
        assert (stats.n_kept == (stats.n_valid > 0).long()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_sum_with_bias_and_softcap(dtype, softcap):
    case = make_case((4, 17), 40, 97, seed=_seed("sum", softcap), bias=True, softcap=softcap, ignore_frac=0.4)
    assert_parity(case, "triton", dtype, keep_ratio=0.7, reduction="sum", scope="sequence", softcap=softcap)


@pytest.mark.parametrize("ref", ["none", "random"])
def test_flat_tokens(ref):
    case = make_case((71,), 40, 97, seed=3, bias=True, ref=ref, ignore_frac=0.3)
    assert_parity(case, "triton", torch.bfloat16, keep_ratio=0.6, reduction="none")


@pytest.mark.parametrize("splits", [None, 3, 4])
def test_vocabulary_splits(monkeypatch, splits):
    """One slice (the CPU default), and uneven slices (97 = 3 x 32 + 1: the last is one column)."""
    monkeypatch.setattr(
        forward_kernel,
        "default_config",
        lambda dtype: forward_kernel.ForwardConfig(block_n=16, block_v=32, block_d=16, splits=splits),
    )
    case = make_case((3, 11), 24, 97, seed=_seed("splits", splits), bias=True)
    assert_parity(case, "triton", torch.float32, keep_ratio=0.6, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    case = make_case((3, 9), 16, 33, bias=True, ignore_frac=1.0, ref="random")
    assert (case.targets == IGNORE).all()
    loss, grads, stats = run(case, "triton", reduction=reduction)
    assert torch.isfinite(loss).all() and not loss.any()
    for g in grads:
        assert g is not None and torch.isfinite(g).all() and not g.any()
    assert stats.n_kept.item() == 0 and stats.n_valid.item() == 0 and not stats.kept.any()
    assert stats.threshold.item() == float("inf")


def test_one_sequence_all_ignored():
    """scope='sequence' with an empty group beside full ones: that group keeps nothing, threshold +inf."""
    case = make_case((3, 9), 16, 33, seed=5, bias=False, ignore_frac=0.2)
    targets = case.targets.clone()
    targets[1] = IGNORE
    case = make_case((3, 9), 16, 33, seed=5, bias=False, ignore_frac=0.0)
    case = replace(case, targets=torch.where(targets == IGNORE, IGNORE, case.targets))
    stats = assert_parity(case, "triton", torch.float32, keep_ratio=0.5, reduction="mean", scope="sequence")
    assert stats.n_kept[1] == 0 and stats.threshold[1] == float("inf")
    assert (stats.n_kept[[0, 2]] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_exact_ties(dtype, scope):
    """Every token has the same logits row (small dyadic values: every product and sum is exact), so
    ce is the same float everywhere and excess = ce - ref ties exactly wherever ref does; the cut
    falls inside a tie level, where the lower index must win."""
    g = torch.Generator().manual_seed(11)
    shape, dim, vocab = (4, 15), 16, 40
    row = torch.randint(-3, 4, (dim,), generator=g).float() / 4
    hidden = row.expand(*shape, dim).clone()
    weight = torch.randint(-3, 4, (vocab, dim), generator=g).float() / 4
    targets = torch.full(shape, 7)
    targets[torch.rand(shape, generator=g) < 0.2] = IGNORE
    ref_loss = torch.randint(0, 3, shape, generator=g).float() * 0.5  # three levels, many ties each
    upstream = torch.randn(shape, generator=g)
    case = Case(hidden, weight, None, targets, ref_loss, upstream).to(dtype)
    stats = assert_parity(case, "triton", dtype, keep_ratio=0.6, reduction="none", scope=scope)
    # the tie at the threshold is really split: some tokens at the threshold excess are dropped
    at_threshold = (stats.excess == stats.threshold.reshape(-1, 1).expand(shape).reshape(shape)) & (targets != IGNORE)
    assert (at_threshold & ~stats.kept).any() and (at_threshold & stats.kept).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_losses_and_linear_cross_entropy(dtype):
    case = make_case((5, 13), 24, 97, seed=7, bias=True, softcap=3.0).to(dtype).on(KERNEL_DEVICE)
    args = (case.hidden.detach(), case.weight.detach(), case.targets)
    ce = rho_fused.token_losses(*args, bias=case.bias.detach(), softcap=3.0, backend="triton")
    ce_ref = rho_fused.token_losses(*args, bias=case.bias.detach(), softcap=3.0, backend="reference")
    assert ce.dtype == torch.float32 and ce.shape == case.targets.shape
    assert not ce[case.targets == IGNORE].any()
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)

    # plain fused cross-entropy equals F.cross_entropy on the fp32 logits of the same inputs
    loss = rho_fused.linear_cross_entropy(*args, bias=case.bias.detach(), backend="triton")
    z = case.hidden.detach().float() @ case.weight.detach().float().T + case.bias.detach().float()
    expected = F.cross_entropy(z.flatten(0, 1), case.targets.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_gradient_only_where_asked():
    """Weight frozen: the backward computes d hidden alone and weight gets no gradient."""
    case = make_case((2, 9), 24, 50, seed=9, bias=False).on(KERNEL_DEVICE)
    hidden = case.hidden.detach().requires_grad_(True)
    weight = case.weight.detach()
    loss = rho_fused.fused_selective_loss(hidden, weight, case.targets, case.ref_loss, backend="triton")
    loss.backward()
    hidden_ref = case.hidden.detach().requires_grad_(True)
    rho_fused.fused_selective_loss(hidden_ref, weight, case.targets, case.ref_loss, backend="reference").backward()
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None


def test_cpu_without_interpreter_is_a_named_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case((2, 5), 16, 33, seed=1)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        rho_fused.fused_selective_loss(case.hidden, case.weight, case.targets, case.ref_loss, backend="triton")


def test_fp64_goes_to_the_chunked_backend():
    """The kernels accumulate in fp32; fp64 inputs get the fp64 contract from the chunked backend."""
    case = make_case((2, 9), 16, 33, seed=4, bias=True)
    assert_parity(case, "triton", torch.float64, keep_ratio=0.6, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_small_upstream_gradient_does_not_underflow(dtype):
    """g = 1e-5 (as a mean over 100k tokens gives): g * softmax is below fp16's smallest subnormal
    (6e-8) for most entries, so the kernel must not cast g * (softmax - onehot) to 16 bits as is.
    Hidden x 16 and weight / 16 keep the logits and put d weight in fp16's normal range."""
    case = make_case((3, 11), 24, 97, seed=17, bias=True)
    case = replace(case, hidden=case.hidden.detach() * 16, weight=case.weight.detach() / 16).to(dtype)
    grads = {}
    for backend in ("triton", "reference"):
        low = case.to(dtype)
        loss = rho_fused.fused_selective_loss(
            low.hidden, low.weight, low.targets, low.ref_loss, bias=low.bias, reduction="sum", backend=backend
        )
        grads[backend] = torch.autograd.grad(loss * 1e-5, [low.hidden, low.weight, low.bias])
    for name, ours, ref in zip(["d hidden", "d weight", "d bias"], grads["triton"], grads["reference"], strict=True):
        scale = ref.float().abs().max()
        assert scale > 0
        # one rounding of the output apart, or one fp16 subnormal step (2^-24) where the output is that small
        err = (ours.float() - ref.float()).abs().max()
        assert err <= 2 * torch.finfo(dtype).eps * scale + 2**-24, f"{name}: {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_in_one_vocabulary_chunk(monkeypatch, dtype):
    """The small_blocks budget walks the vocabulary in 32-column chunks; a large budget takes it in one."""
    monkeypatch.setattr(
        backward_kernel,
        "default_config",
        lambda dtype: backward_kernel.BackwardConfig(block_n=16, block_v=32, block_d=16, group_n=2),
    )
    case = make_case((3, 11), 24, 97, seed=_seed("one chunk", dtype), bias=True)
    assert backward_plan(33, 97, 24, dtype, backward_kernel.default_config(dtype)).chunk_columns >= 97
    assert_parity(case, "triton", dtype, keep_ratio=0.6, reduction="none")


def test_chunk_columns_from_the_budget():
    cfg = backward_kernel.BackwardConfig(block_v=128, budget_bytes=2**20)
    # [C, Vc] bf16 within 1 MiB, a multiple of the tile width: 1 MiB / (1000 * 2) = 524 -> 512
    assert backward_plan(1000, 128256, 64, torch.bfloat16, cfg).chunk_columns == 512
    # fp16 also budgets the [Vc, D] fp32 product: 1 MiB / (1000 * 2 + 64 * 4) = 464 -> 384
    assert backward_plan(1000, 128256, 64, torch.float16, cfg).chunk_columns == 384
    # never below one tile, never past the vocabulary (rounded up to a tile)
    assert backward_plan(10**9, 128256, 64, torch.bfloat16, cfg).chunk_columns == 128
    assert backward_plan(1, 200, 64, torch.bfloat16, cfg).chunk_columns == 256


def test_forward_plan_splits():
    cfg = forward_kernel.ForwardConfig(block_n=128, block_v=128)
    # no SM count (no GPU to fill): one slice over the whole vocabulary
    assert forward_plan(8192, 128256, None, cfg).splits == 1
    # eight programs per SM: 64 row tiles on 132 SMs want ceil(1056 / 64) = 17 slices, 256 want 5
    assert forward_plan(8192, 128256, 132, cfg).splits == 17
    assert forward_plan(32768, 128256, 132, cfg).splits == 5
    # never more slices than vocabulary tiles, nor an empty one: 97 columns in 32-wide tiles asked
    # for 3 slices get ceil(97 / 3) = 33 -> 64 columns each, so 2 slices
    small = forward_kernel.ForwardConfig(block_n=16, block_v=32, splits=3)
    plan = forward_plan(33, 97, None, small)
    assert (plan.splits, plan.v_per_split) == (2, 64)
    assert forward_plan(33, 97, 132, replace(small, splits=None)).splits == 4
    assert forward_plan(33, 97, 132, replace(small, splits=None)).programs == 3 * 4


def test_backward_is_bit_identical_across_runs():
    """No atomics and no uninitialised buffer read: two backward passes give the same bits
    (several vocabulary chunks, ignored rows, so the kept list has zero rows past its count)."""
    case = make_case((3, 11), 24, 97, seed=23, bias=True, ignore_frac=0.4).to(torch.bfloat16)
    first, second = (run(case, "triton", keep_ratio=0.6, reduction="none")[1] for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,scope", [((5, 13), "batch"), ((5, 13), "sequence"), ((71,), "batch")])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.6, 0.01])
def test_kept_capacity_bounds_the_kept_count(shape, scope, keep_ratio):
    """The host-side capacity of the backward's matmuls is never below the kept count, and equals it
    when every token is valid (no zero rows then)."""
    for ignore_frac in (0.0, 0.3):
        case = make_case(shape, 8, 11, seed=_seed(shape, scope, keep_ratio, ignore_frac), ignore_frac=ignore_frac)
        p = make_problem(
            case.hidden, case.weight, case.targets, case.ref_loss, keep_ratio=keep_ratio, bias=None,
            ignore_index=IGNORE, reduction="mean", scope=scope, softcap=None,
        )  # fmt: skip
        _, _, stats = rho_fused.backends.reference.selective_loss(p)
        n_kept = int(stats.n_kept.sum())
        capacity = triton_backend.kept_capacity(p)
        assert n_kept <= capacity <= case.targets.numel()
        if ignore_frac == 0.0:
            assert capacity == n_kept


def test_launches_run_under_the_device_guard(monkeypatch):
    """Triton launches on the current CUDA device: every launch of the backend must run inside
    `_on_device(hidden)`. Here (no GPU) the guard is a no-op context on CPU tensors, so this checks
    the code path, that forward, backward and token_losses launch inside the guard, not that
    ``torch.cuda.device`` picks the right GPU."""
    assert isinstance(triton_backend._on_device(torch.zeros(1)), contextlib.nullcontext)
    depth = []
    real_guard = triton_backend._on_device

    @contextlib.contextmanager
    def recording_guard(t):
        depth.append(t.device)
        try:
            with real_guard(t):
                yield
        finally:
            depth.pop()

    calls = []

    def inside(name, fn):
        def wrapped(*args, **kwargs):
            calls.append((name, list(depth)))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(triton_backend, "_on_device", recording_guard)
    for name in ("compact_mask", "logsumexp_partials", "merge_partials", "radix_top_k", "kept_rows_backward"):
        monkeypatch.setattr(triton_backend, name, inside(name, getattr(triton_backend, name)))
    case = make_case((3, 11), 24, 97, seed=29, bias=True).on(KERNEL_DEVICE)
    run(case, "triton", keep_ratio=0.6, reduction="mean")
    rho_fused.token_losses(case.hidden.detach(), case.weight.detach(), case.targets, backend="triton")
    names = {name for name, _ in calls}
    assert names == {"compact_mask", "logsumexp_partials", "merge_partials", "radix_top_k", "kept_rows_backward"}
    assert all(guards == [case.hidden.device] for _, guards in calls), calls
