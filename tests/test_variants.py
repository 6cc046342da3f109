"""The contract's variants (threshold, sampled and soft selection, token weights, several references,
z-loss, label smoothing, the returned logsumexp): the reference against the contract's words, then
the chunked and triton backends against the reference and the fp64 truth (`cases.assert_parity`:
the same kept set and weights, loss, ``lse`` and every gradient no further from the truth than
PyTorch in the same dtype)."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from cases import IGNORE, KERNEL_DEVICE, Case, assert_parity, make_case, run
from hypothesis import given, settings
from hypothesis import strategies as st

import rho_fused
from rho_fused.backends import chunked
from rho_fused.problem import keep_count_int


def _seed(*parts: object) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def several_references(case: Case, k: int = 3, seed: int = 0) -> Case:
    """``ref_loss [K, ...]``: the case's spaced reference plus a per-token offset in [0, 0.2) for each
    of the K, so that mean, min and max all keep the excess levels 0.3 apart at least."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.rand(k, *case.ref_loss.shape, generator=g) * 0.2
    return replace(case, ref_loss=case.ref_loss + offsets)


def token_weights(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random weights in [0, 2), a quarter of them exactly 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(shape, generator=g) * 2
    return torch.where(torch.rand(shape, generator=g) < 0.25, 0.0, w)


# One option set per variant; threshold 0.25 falls midway between the spaced excess levels (multiples
# of 0.5), so no token sits on it whatever the rounding.
VARIANTS = {
    "threshold": dict(selection="threshold", threshold=0.25),
    "sample": dict(selection="sample", generator=7, keep_ratio=0.5),
    "soft": dict(weighting="soft", threshold=3.0, temperature=2.0),
    "token_weights": dict(keep_ratio=0.7),
    "refs_mean": dict(ref_reduce="mean"),
    "refs_min": dict(ref_reduce="min"),
    "refs_max": dict(ref_reduce="max", keep_ratio=0.4),
    "z_loss": dict(z_loss=1e-2),
    "label_smoothing": dict(label_smoothing=0.1),
    "return_lse": dict(return_lse=True),
    "mixed": dict(selection="sample", generator=3, ref_reduce="max", z_loss=1e-3, label_smoothing=0.2, return_lse=True),
    "mixed_soft": dict(weighting="soft", temperature=0.5, ref_reduce="min", z_loss=1e-3, label_smoothing=0.05),
}
REDUCTIONS = ["mean", "sum", "none"]
SCOPES = ["batch", "sequence"]


def variant_case(name: str, shape=(5, 13), dim=24, vocab=97, seed=0, bias=True, softcap=None):
    """The case and options of variant ``name`` (the reduction and scope cycle with the name).

    The bias is offset by 3: the loss's terms do not change with a constant added to every logit,
    but a wrong sum of the logits (label smoothing) then shows in the loss."""
    case = make_case(shape, dim, vocab, seed=seed, bias=bias, softcap=softcap)
    if bias:
        case = replace(case, bias=(case.bias.detach() + 3.0).requires_grad_())
    options = dict(VARIANTS[name])
    if name.startswith("refs") or name.startswith("mixed"):
        case = several_references(case, seed=seed)
    if name in ("token_weights", "mixed", "mixed_soft"):
        options["token_weights"] = token_weights(shape, seed)
    index = list(VARIANTS).index(name)
    options.update(reduction=REDUCTIONS[index % 3], scope=SCOPES[index % 2], softcap=softcap)
    return case, options


# --- the reference against the contract's words -------------------------------------------------


def _reference(case: Case, **options):
    out = rho_fused.fused_selective_loss(
        case.hidden, case.weight, case.targets, case.ref_loss, bias=case.bias, backend="reference",
        return_stats=True, **options,
    )  # fmt: skip
    return out


def test_reference_threshold_keeps_excess_above_it():
    case = make_case((4, 15), 16, 41, seed=1, bias=True, ref="random")
    for threshold in (-1.0, 0.0, 1.5):
        loss, stats = _reference(case, selection="threshold", threshold=threshold, scope="sequence")
        valid = case.targets != IGNORE
        assert torch.equal(stats.kept, valid & (stats.excess > threshold))
        assert torch.equal(stats.n_kept, stats.kept.sum(1)) and (stats.threshold == threshold).all()
        expected = (stats.ce * stats.kept).sum() / stats.kept.sum()
        torch.testing.assert_close(loss, expected)


def test_reference_soft_weights_are_sigmoids():
    case = make_case((3, 11), 16, 41, seed=2, bias=True, ref="random")
    tw = token_weights((3, 11), seed=2)
    loss, stats = _reference(case, weighting="soft", threshold=0.5, temperature=0.7, token_weights=tw)
    valid = case.targets != IGNORE
    w = torch.sigmoid((stats.excess - 0.5) / 0.7) * tw * valid
    assert torch.equal(stats.kept, valid)
    torch.testing.assert_close(stats.weight, w)
    torch.testing.assert_close(stats.weight_sum, w.sum())
    torch.testing.assert_close(loss, (w * stats.ce).sum() / w.sum())


def test_reference_sample_is_gumbel_top_k_of_the_generator():
    """The kept set is the top n_keep of log(max(excess, 0) + 1e-6) - log(-log(U)), U drawn from the
    generator as the contract says; the same seed keeps the same tokens, another seed others."""
    case = make_case((40,), 16, 41, seed=3, ref="random", ignore_frac=0.2)
    kept = []
    for seed in (11, 11, 12):
        _, stats = _reference(case, selection="sample", keep_ratio=0.3, generator=torch.Generator().manual_seed(seed))
        u = torch.rand((40,), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        keys = torch.log(stats.excess.clamp(min=0) + 1e-6) - torch.log(-torch.log(u))
        valid = case.targets != IGNORE
        n_keep = keep_count_int(int(valid.sum()), 0.3)
        order = sorted(valid.nonzero().squeeze(1).tolist(), key=lambda i: (-keys[i].item(), i))
        expected = torch.zeros(40, dtype=torch.bool)
        expected[order[:n_keep]] = True
        assert torch.equal(stats.kept, expected) and stats.n_kept == n_keep
        assert stats.threshold == keys[order[n_keep - 1]]
        kept.append(stats.kept)
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])


def test_sampling_favours_large_excess():
    """Tokens of excess <= 0 have weight 1e-6: with many valid tokens of positive excess, none is drawn."""
    case = make_case((60,), 16, 41, seed=4, ref="none", ignore_frac=0.0)
    ref = torch.where(torch.arange(60) % 2 == 0, 0.0, 1e3)  # odd tokens: excess << 0
    _, stats = rho_fused.fused_selective_loss(
        case.hidden, case.weight, case.targets, ref, keep_ratio=0.4, selection="sample", backend="reference",
        generator=torch.Generator().manual_seed(0), return_stats=True,
    )  # fmt: skip
    assert stats.kept.sum() == 24 and not stats.kept[1::2].any()


@pytest.mark.parametrize("ref_reduce", ["mean", "min", "max"])
def test_reference_several_references(ref_reduce):
    case = several_references(make_case((3, 7), 16, 41, seed=5), seed=5)
    _, stats = _reference(case, ref_reduce=ref_reduce)
    combined = {"mean": case.ref_loss.mean(0), "min": case.ref_loss.amin(0), "max": case.ref_loss.amax(0)}[ref_reduce]
    valid = case.targets != IGNORE
    torch.testing.assert_close(stats.excess, torch.where(valid, stats.ce - combined, 0.0))


def test_reference_z_loss_smoothing_and_lse_are_torchs():
    """keep 1, no reference: the loss is torch's label-smoothed cross-entropy plus c * lse^2, and
    ``lse`` is torch.logsumexp of the logits (0 at ignored tokens), gradients included."""
    case = make_case((3, 9), 16, 41, seed=6, bias=True, ref="none")
    loss, lse, _ = _reference(case, keep_ratio=1.0, z_loss=0.01, label_smoothing=0.15, return_lse=True)
    z = case.hidden @ case.weight.T + case.bias
    valid = case.targets != IGNORE
    ce = F.cross_entropy(z.transpose(1, 2), case.targets, ignore_index=IGNORE, label_smoothing=0.15, reduction="none")
    torch_lse = torch.where(valid, torch.logsumexp(z, -1), 0.0)
    expected = (ce + 0.01 * torch_lse.square() * valid).sum() / valid.sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(lse, torch_lse)
    up = torch.randn(3, 9)
    got = torch.autograd.grad(loss + (lse * up).sum(), [case.hidden, case.weight])
    want = torch.autograd.grad(expected + (torch_lse * up).sum(), [case.hidden, case.weight])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# --- chunked and triton against the reference ----------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_variant(name, monkeypatch):
    # tiles of a few rows and 16 columns, as in test_parity_chunked
    monkeypatch.setattr(chunked, "MIN_TILE_COLS", 16)
    monkeypatch.setattr(chunked, "FORWARD_BUDGET_BYTES", 7 * 97 * 4 * 2)
    monkeypatch.setattr(chunked, "BACKWARD_BUDGET_BYTES", 8 * 6 * 24 * 4)
    case, options = variant_case(name, seed=_seed("chunked", name), softcap=3.0 if name == "mixed" else None)
    for dtype in (torch.float32, torch.bfloat16):
        assert_parity(case, "chunked", dtype, **options)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_variant(name):
    case, options = variant_case(name, seed=_seed("triton", name), softcap=3.0 if name == "mixed_soft" else None)
    dtype = torch.bfloat16 if name in ("mixed", "z_loss") else torch.float32
    assert_parity(case, "triton", dtype, **options)


@pytest.mark.usefixtures("small_blocks")
def test_triton_variant_fp16_weights_and_z_loss():
    """fp16: the backward's power-of-two scale covers the softmax coefficient (z-loss, lse's gradient)."""
    case, options = variant_case("mixed", seed=_seed("fp16"))
    assert_parity(case, "triton", torch.float16, **options)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_sample_keeps_the_same_tokens_on_every_backend(backend, small_blocks):
    """The same generator state, the same kept tokens (here the excess is random: no spacing)."""
    case = make_case((4, 19), 16, 41, seed=8, ref="random", ignore_frac=0.2)
    options = dict(selection="sample", keep_ratio=0.5, scope="sequence")
    kept = {b: run(case, b, generator=1234, **options)[2].kept for b in ("reference", backend)}
    assert torch.equal(kept[backend], kept["reference"])


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
def test_lse_gradient_reaches_dropped_rows(backend, small_blocks):
    """Without a gradient of lse the backward covers the kept rows only (d hidden is 0 elsewhere);
    with one, every valid row, kept or not, and no ignored row."""
    case = make_case((3, 11), 16, 41, seed=9).on(KERNEL_DEVICE if backend == "triton" else "cpu")
    loss, lse, stats = rho_fused.fused_selective_loss(
        case.hidden, case.weight, case.targets, case.ref_loss, keep_ratio=0.3, backend=backend, return_lse=True,
        return_stats=True,
    )  # fmt: skip
    (d_loss,) = torch.autograd.grad(loss, [case.hidden], retain_graph=True)
    (d_lse,) = torch.autograd.grad(lse.sum(), [case.hidden])
    rows_loss, rows_lse = d_loss.abs().sum(-1) > 0, d_lse.abs().sum(-1) > 0
    assert torch.equal(rows_loss.cpu(), stats.kept.cpu())
    assert torch.equal(rows_lse.cpu(), (case.targets != IGNORE).cpu())


def test_mean_with_zero_weights_is_zero():
    """Every kept token weighted 0: the mean is 0 (not NaN), and so is every gradient."""
    case = make_case((2, 9), 16, 41, seed=10, ref="random")
    for backend in ("reference", "chunked"):
        loss = rho_fused.fused_selective_loss(
            case.hidden, case.weight, case.targets, case.ref_loss, token_weights=torch.zeros(2, 9), backend=backend
        )
        (dh,) = torch.autograd.grad(loss, [case.hidden])
        assert loss.item() == 0.0 and not dh.any()


@settings(max_examples=25, deadline=None)
@given(
    selection=st.sampled_from(["topk", "threshold", "sample", "soft"]),
    reduction=st.sampled_from(REDUCTIONS),
    scope=st.sampled_from(SCOPES),
    refs=st.sampled_from([0, 1, 3]),
    ref_reduce=st.sampled_from(["mean", "min", "max"]),
    weights=st.booleans(),
    z_loss=st.sampled_from([0.0, 1e-3, 0.05]),
    label_smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    return_lse=st.booleans(),
    bias=st.booleans(),
    softcap=st.sampled_from([None, 2.0]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_mixed_variants_chunked(
    selection, reduction, scope, refs, ref_reduce, weights, z_loss, label_smoothing, return_lse, bias, softcap,
    ignore_frac, seed,
):  # fmt: skip
    """Random mixtures of every option, chunked against the reference (fp32, tiny tiles)."""
    shape = (3, 7)
    case = make_case(shape, 12, 29, seed=seed, bias=bias, softcap=softcap, ignore_frac=ignore_frac)
    if refs == 0:
        case = replace(case, ref_loss=None)
    elif refs == 3:
        case = several_references(case, seed=seed)
    options = dict(reduction=reduction, scope=scope, ref_reduce=ref_reduce, z_loss=z_loss, softcap=softcap)
    options.update(label_smoothing=label_smoothing, return_lse=return_lse)
    if selection == "soft":
        options.update(weighting="soft", temperature=0.5)
    elif selection == "threshold":
        options.update(selection="threshold", threshold=0.25)
    elif selection == "sample":
        options.update(selection="sample", generator=seed, keep_ratio=0.5)
    if weights:
        options["token_weights"] = token_weights(shape, seed)
    budgets = chunked.FORWARD_BUDGET_BYTES, chunked.BACKWARD_BUDGET_BYTES, chunked.MIN_TILE_COLS
    chunked.FORWARD_BUDGET_BYTES, chunked.BACKWARD_BUDGET_BYTES, chunked.MIN_TILE_COLS = 3 * 29 * 8, 3 * 6 * 48, 8
    try:
        assert_parity(case, "chunked", torch.float32, **options)
    finally:
        chunked.FORWARD_BUDGET_BYTES, chunked.BACKWARD_BUDGET_BYTES, chunked.MIN_TILE_COLS = budgets


@pytest.mark.usefixtures("small_blocks")
@settings(max_examples=4, deadline=None)
@given(
    selection=st.sampled_from(["threshold", "sample", "soft"]),
    reduction=st.sampled_from(REDUCTIONS),
    z_loss=st.sampled_from([0.0, 0.02]),
    label_smoothing=st.sampled_from([0.0, 0.3]),
    return_lse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mixed_variants_triton(selection, reduction, z_loss, label_smoothing, return_lse, seed):
    """A few random mixtures on the kernels (the interpreter is slow), several references and weights."""
    shape = (3, 7)
    case = several_references(make_case(shape, 16, 37, seed=seed, bias=True), seed=seed)
    options = dict(reduction=reduction, ref_reduce="min", z_loss=z_loss, label_smoothing=label_smoothing)
    options.update(return_lse=return_lse, token_weights=token_weights(shape, seed))
    options.update(
        {"threshold": dict(selection="threshold", threshold=0.25), "sample": dict(selection="sample", generator=seed),
         "soft": dict(weighting="soft")}[selection]
    )  # fmt: skip
    assert_parity(case, "triton", torch.float32, **options)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("name", ["threshold", "sample", "mixed_soft", "mixed"])
def test_variants_on_empty_inputs(backend, name):
    """No token at all (N = 0, and zero sequences with scope='sequence'): loss 0, empty lse, zero gradients."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    options = dict(VARIANTS[name], return_lse=True, return_stats=True)
    options.pop("generator", None)
    for shape, scope in (((0,), "batch"), ((0, 5), "sequence")):
        hidden = torch.randn(*shape, 8, device=device, requires_grad=True)
        weight = torch.randn(11, 8, device=device, requires_grad=True)
        targets = torch.zeros(shape, dtype=torch.long, device=device)
        refs = torch.zeros(2, *shape, device=device)
        loss, lse, stats = rho_fused.fused_selective_loss(
            hidden, weight, targets, refs, backend=backend, scope=scope, token_weights=torch.ones(shape, device=device),
            **{k: v for k, v in options.items() if k not in ("scope", "reduction")},
        )  # fmt: skip
        assert loss.item() == 0.0 and lse.shape == shape and stats.kept.shape == shape
        dh, dw = torch.autograd.grad(loss + lse.sum(), [hidden, weight])
        assert dh.shape == hidden.shape and not dw.any()
