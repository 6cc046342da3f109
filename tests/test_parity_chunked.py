"""The chunked backend against the reference and the fp64 truth, forward and every gradient."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from cases import IGNORE, Case, assert_parity, make_case, run

import rho_fused
from rho_fused.backends import chunked, products, workers
from rho_fused.validation import make_problem

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Tiles of a few rows and 16 columns, so every shape below spans several blocks of rows and of
    columns, the last ones short; the one-pass path (plain CE) in blocks of 9 rows and 16 columns,
    by rows (products in place, whatever this CPU's measurement would choose)."""
    monkeypatch.setattr(products, "IN_PLACE_PRODUCTS", True)
    monkeypatch.setattr(chunked, "MIN_TILE_COLS", 16)
    monkeypatch.setattr(chunked, "FORWARD_BUDGET_BYTES", 7 * 97 * 4 * 2)
    monkeypatch.setattr(chunked, "BACKWARD_BUDGET_BYTES", 8 * 6 * 24 * 4)
    small_single_pass(monkeypatch, rows=9, cols=16)


def small_single_pass(monkeypatch, rows: int, cols: int) -> None:
    """The one-pass path by tiles in blocks of ``rows`` rows (V = 97, D = 24, fp32 or lower) and tiles
    of ``cols`` columns; by rows, in blocks of ``rows`` rows over 3 buffers or fewer."""
    monkeypatch.setattr(chunked, "SINGLE_PASS_BUDGET_BYTES", rows * (97 + (chunked.DH_GROUPS + 1) * 24) * 4)
    monkeypatch.setattr(chunked, "SINGLE_PASS_BUDGET_OF_DW", 0.0)
    monkeypatch.setattr(chunked, "SINGLE_PASS_BUDGET_OF_LOGITS", 1.0)
    monkeypatch.setattr(chunked, "SINGLE_PASS_SMALL_BYTES", 0)
    monkeypatch.setattr(chunked, "MIN_SINGLE_PASS_ROWS", 1)
    monkeypatch.setattr(chunked, "SINGLE_PASS_TILE_ELEMS", rows * cols)


# Whether this torch has what bf16 products need: oneDNN's fp32 precision modes (2.9+) and its linear.
BF16_MODES = products._matmul_precision() is not None and products._ONEDNN_LINEAR is not None


class CountSinglePass:
    """Counts the one-pass path's calls (by rows or by tiles, monkeypatched over `chunked._single_pass_rows`
    and `chunked._single_pass`); a call of the other path fails."""

    def __init__(self, monkeypatch, path: str = "rows") -> None:
        self.calls = 0
        for name, which in (("_single_pass_rows", "rows"), ("_single_pass", "tiles")):
            inner = getattr(chunked, name)

            def counted(*args, inner=inner, which=which):
                assert which == path, f"the one pass ran by {which}, not by {path}"
                self.calls += 1
                return inner(*args)

            monkeypatch.setattr(chunked, name, counted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "variant",
    [{}, {"bias": True}, {"z_loss": 1e-3}, {"label_smoothing": 0.1}, {"z_loss": 1e-2, "label_smoothing": 0.2}],
    ids=str,
)
@pytest.mark.parametrize("path", ["rows", "tiles"])
def test_single_pass(monkeypatch, dtype, reduction, variant, path):
    """Plain CE with gradients needed forms them in the forward, block by block (by rows: 9 rows and
    2 threads' stripes; by tiles, as on a CPU where oneDNN's products win: 9 rows, 16 columns, 8
    groups of tiles), as close to the fp64 truth as PyTorch, strided hidden and ignored tokens too."""
    if path == "tiles":
        monkeypatch.setattr(products, "IN_PLACE_PRODUCTS", False)
    count = CountSinglePass(monkeypatch, path)
    options = dict(variant)
    case = make_case((5, 13), 24, 97, seed=len(str(variant)) + 7, bias=options.pop("bias", False), ref="none")
    case = replace(case, hidden=case.hidden.transpose(0, 1).contiguous().transpose(0, 1))  # strided [5, 13, 24]
    assert not case.hidden.is_contiguous()
    assert_parity(case, "chunked", dtype, keep_ratio=1.0, reduction=reduction, **options)
    assert count.calls == 1  # the reference and the truth take their own paths


def test_single_pass_equals_two_passes(monkeypatch):
    """The one-pass path's loss, stats and gradients against the forward-then-backward path's (forced
    by a budget too small for it), with several blocks of rows, an upstream gradient of 2.5."""
    case = make_case((5, 13), 24, 97, seed=5, bias=True, ref="none")

    def loss_and_grads():
        h, w, b = (t.detach().clone().requires_grad_() for t in (case.hidden, case.weight, case.bias))
        loss = rho_fused.linear_cross_entropy(h, w, case.targets, bias=b, backend="chunked")
        (2.5 * loss).backward()
        return [loss.detach(), h.grad, w.grad, b.grad]

    count = CountSinglePass(monkeypatch)
    one = loss_and_grads()
    assert count.calls == 1
    monkeypatch.setattr(chunked, "MIN_SINGLE_PASS_ROWS", 10**6)
    two = loss_and_grads()
    assert count.calls == 1
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_single_pass_lse_gradient_and_retain_graph(monkeypatch):
    """When lse has a gradient too, or a second backward runs (retain_graph), the backward recomputes
    (the gradients formed in the forward serve one backward of the loss alone): every backward's
    gradients equal the reference's."""
    count = CountSinglePass(monkeypatch)
    case = make_case((4, 11), 24, 97, seed=9, ref="none")
    got = {}
    for backend in ("chunked", "reference"):
        h, w = (t.detach().clone().requires_grad_() for t in (case.hidden, case.weight))
        loss, lse = rho_fused.fused_selective_loss(
            h, w, case.targets, None, keep_ratio=1.0, backend=backend, return_lse=True
        )
        (loss + 0.3 * lse.sum()).backward(retain_graph=True)
        first = [h.grad.clone(), w.grad.clone()]
        h.grad = w.grad = None
        loss.backward(retain_graph=True)
        loss_only = [h.grad.clone(), w.grad.clone()]
        h.grad = w.grad = None
        loss.backward()
        got[backend] = first, loss_only, [h.grad, w.grad]
    assert count.calls == 1
    for a, b in zip(got["chunked"], got["reference"], strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_single_pass_not_taken_without_gradients(monkeypatch):
    """No gradient needed (no_grad, or inputs that do not require one): the plain forward."""
    count = CountSinglePass(monkeypatch)
    case = make_case((3, 7), 24, 97, ref="none")
    h, w, t = case.hidden.detach(), case.weight.detach(), case.targets
    with torch.no_grad():
        rho_fused.linear_cross_entropy(h.clone().requires_grad_(), w, t, backend="chunked")
    rho_fused.linear_cross_entropy(h, w, t, backend="chunked")
    loss = rho_fused.linear_cross_entropy(h.clone().requires_grad_(), w, t, reduction="none", backend="chunked")
    assert count.calls == 0 and loss.requires_grad
    rho_fused.linear_cross_entropy(h.clone().requires_grad_(), w, t, backend="chunked")
    assert count.calls == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.6, 0.01])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 4.0), (True, 2.5)])
def test_matches_reference(dtype, reduction, scope, keep_ratio, bias, softcap):
    # [B, T] = [5, 13]: 65 tokens, not a multiple of the 7-row chunk; 97 is no power of two.
    seed = zlib.crc32(f"{reduction}{scope}{keep_ratio}{bias}{softcap}".encode())
    case = make_case((5, 13), 24, 97, seed=seed, bias=bias, softcap=softcap)
    stats = assert_parity(
        case, "chunked", dtype, keep_ratio=keep_ratio, reduction=reduction, scope=scope, softcap=softcap
    )
    if keep_ratio == 0.01:  # keeps a single token per group
        assert (stats.n_kept == (stats.n_valid > 0).long()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ref", ["none", "random"])
def test_flat_tokens(dtype, ref):
    case = make_case((71,), 40, 97, seed=3, bias=True, ref=ref, ignore_frac=0.3)
    assert_parity(case, "chunked", dtype, keep_ratio=0.6, reduction="none")


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(backend, reduction):
    case = make_case((3, 9), 16, 33, bias=True, ignore_frac=1.0, ref="random")
    assert (case.targets == IGNORE).all()
    loss, grads, stats = run(case, backend, reduction=reduction)
    assert torch.isfinite(loss).all() and not loss.any()
    for g in grads:
        assert g is not None and torch.isfinite(g).all() and not g.any()
    assert stats.n_kept.item() == 0 and stats.n_valid.item() == 0 and not stats.kept.any()
    assert stats.threshold.item() == float("inf")


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_keep_count_is_exact(backend):
    # 0.7 * 10 and 0.6 * 10 must not round up past the integer they denote.
    case = make_case((10,), 8, 33, ignore_frac=0.0)
    for ratio, expected in [(0.7, 7), (0.6, 6), (0.3, 3), (0.1, 1), (0.11, 2), (1.0, 10), (1e-9, 1)]:
        _, _, stats = run(case, backend, keep_ratio=ratio)
        assert stats.n_kept.item() == expected, ratio
        assert stats.kept.sum().item() == expected


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_ties_go_to_lower_index(backend):
    # hidden = 0: every logit row equals the bias, so tokens with equal targets have equal ce.
    n, vocab = 23, 17
    targets = torch.tensor([3, 5] * 11 + [3])
    targets[[1, 4, 8]] = IGNORE
    case = Case(
        hidden=torch.zeros(n, 8, requires_grad=True),
        weight=torch.randn(vocab, 8, requires_grad=True),
        bias=torch.randn(vocab, requires_grad=True),
        targets=targets,
        ref_loss=None,
        upstream=torch.randn(n),
    )
    ce = torch.logsumexp(case.bias.detach(), 0) - case.bias.detach()
    high, low = (3, 5) if ce[3] > ce[5] else (5, 3)
    valid_high = [i for i in range(n) if targets[i] == high]
    valid_low = [i for i in range(n) if targets[i] == low]
    n_valid = len(valid_high) + len(valid_low)
    keep = 0.6
    n_keep = -(-6 * n_valid // 10)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[valid_high[:n_keep]] = True
    expected[valid_low[: max(0, n_keep - len(valid_high))]] = True
    _, _, stats = run(case, backend, keep_ratio=keep)
    assert torch.equal(stats.kept, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(45,), (4, 11)])
def test_plain_cross_entropy(dtype, shape):
    """``ref_loss=None, keep_ratio=1.0`` is ``F.cross_entropy`` on the full logits."""
    case = make_case(shape, 24, 97, dtype=dtype, bias=True, ref="none", seed=7)
    loss, grads, _ = run(case, "chunked", keep_ratio=1.0)
    logits = case.hidden @ case.weight.T + case.bias
    expected = F.cross_entropy(logits.flatten(0, -2), case.targets.flatten(), ignore_index=IGNORE)
    expected_grads = torch.autograd.grad(expected, [case.hidden, case.weight, case.bias])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, expected.detach(), **tol)
    for ours, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, **tol)
    lce = rho_fused.linear_cross_entropy(case.hidden, case.weight, case.targets, bias=case.bias)
    torch.testing.assert_close(lce, expected, **tol)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_token_losses(backend):
    case = make_case((3, 17), 16, 97, bias=True, ref="none")
    ce = rho_fused.token_losses(case.hidden, case.weight, case.targets, bias=case.bias, backend=backend)
    assert ce.dtype == torch.float32 and ce.shape == case.targets.shape and not ce.requires_grad
    expected = F.cross_entropy(
        (case.hidden @ case.weight.T + case.bias).transpose(1, 2), case.targets, ignore_index=IGNORE, reduction="none"
    )
    torch.testing.assert_close(ce, expected.detach(), rtol=1e-5, atol=1e-6)
    assert not ce[case.targets == IGNORE].any()


def test_stats_are_consistent():
    case = make_case((4, 19), 16, 97, bias=True, ref="random", seed=11)
    loss, stats = rho_fused.fused_selective_loss(
        case.hidden, case.weight, case.targets, case.ref_loss, bias=case.bias, scope="sequence", return_stats=True
    )
    valid = case.targets != IGNORE
    assert torch.equal(stats.n_valid, valid.sum(1))
    assert torch.equal(stats.n_kept, stats.kept.sum(1))
    torch.testing.assert_close(stats.excess[valid], stats.ce[valid] - case.ref_loss[valid])
    for row in range(4):
        kept, ex = stats.kept[row], stats.excess[row]
        assert (ex[kept] >= stats.threshold[row]).all()
        assert (ex[valid[row] & ~kept] <= stats.threshold[row]).all()
    torch.testing.assert_close(loss, (stats.ce * stats.kept).sum() / stats.n_kept.sum())
    assert not any(t.requires_grad for t in (stats.ce, stats.excess, stats.threshold))


def test_frozen_weight_and_module():
    case = make_case((2, 21), 16, 97, bias=True)
    weight = case.weight.detach()
    loss_fn = rho_fused.SelectiveLMLoss(keep_ratio=0.5, reduction="sum")
    loss = loss_fn(case.hidden, weight, case.targets, case.ref_loss, bias=case.bias)
    expected = rho_fused.fused_selective_loss(
        case.hidden, weight, case.targets, case.ref_loss, keep_ratio=0.5, reduction="sum", bias=case.bias,
        backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss, [case.hidden, case.bias])
    want = torch.autograd.grad(expected, [case.hidden, case.bias])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 3.0)])
def test_blocks_wider_than_dim(dtype, bias, softcap):
    """D = 8, fewer than the rows of a block: d hidden takes the path that copies W_c^T, not the tile."""
    case = make_case((5, 13), 8, 97, seed=21, bias=bias, softcap=softcap, ignore_frac=0.1)
    problem = make_problem(
        case.hidden, case.weight, case.targets, case.ref_loss, keep_ratio=0.8, bias=case.bias,
        ignore_index=IGNORE, reduction="none", scope="batch", softcap=softcap,
    )  # fmt: skip
    kept = int(problem.valid.sum() * 0.8)
    assert min(chunked.backward_tile(problem, kept, buffers)[0] for buffers in (2, 3)) > 8
    assert_parity(case, "chunked", dtype, keep_ratio=0.8, reduction="none", softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_masking_whole_tiles(dtype):
    """A bias of -inf over the padded end of the vocabulary: tiles with no finite logit add nothing."""
    case = make_case((4, 9), 24, 97, seed=8, bias=True, ref="random", ignore_frac=0.2)
    with torch.no_grad():
        case.bias[40:] = float("-inf")
        case.targets.clamp_(max=39)
    losses = {}
    for backend in ("chunked", "reference"):
        loss = rho_fused.fused_selective_loss(
            case.hidden.to(dtype), case.weight.to(dtype), case.targets, case.ref_loss, keep_ratio=0.6,
            bias=case.bias.to(dtype), ignore_index=IGNORE, backend=backend,
        )  # fmt: skip
        losses[backend] = (loss, *torch.autograd.grad(loss, [case.hidden, case.weight]))
    for got, want in zip(losses["chunked"], losses["reference"], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def spy_direct_dw(monkeypatch) -> list[tuple[bool, bool]]:
    """Per backward (`_Grads`), whether d W was written once in the weight's dtype, and by a bf16 product."""
    direct: list[tuple[bool, bool]] = []
    result = chunked._Grads.result

    def spy(self):
        direct.append((self.direct_dw, self.h_bf16 is not None))
        return result(self)

    monkeypatch.setattr(chunked._Grads, "result", spy)
    return direct


@pytest.mark.parametrize(
    "dtype,bf16_products", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, None)], ids=str
)
@pytest.mark.parametrize("keep_ratio,reduction", [(0.6, "mean"), (0.6, "none"), (1.0, "mean")])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_weight_gradient_of_16_bit_weights(monkeypatch, dtype, bf16_products, keep_ratio, reduction, blocks):
    """16-bit weights: when one block of rows holds every kept row (its buffers no larger than an
    fp32 d W, or two where plain CE's one pass is the other choice), d W is written once in the
    weight's dtype, each tile scaled and rounded once; over several blocks it is summed in fp32.
    With bf16 products that one write is a product of bf16 operands. Plain CE then takes two passes
    rather than the one pass, which holds the head and d W in fp32. All as near the fp64 truth as
    PyTorch."""
    monkeypatch.setattr(products, "BF16_PRODUCTS", bf16_products)
    direct = spy_direct_dw(monkeypatch)
    monkeypatch.setattr(workers, "threads_for", lambda device: 2)
    count = CountSinglePass(monkeypatch)
    # 20 to 33 kept rows, 2 workers: one block needs 3 * 12 * rows * 24 / 2 elements, under 1000 * 24, over 97 * 24
    vocab = 1000 if blocks == "one" else 97
    case = make_case((3, 11), 24, vocab, seed=13, bias=True, ignore_frac=0.1)
    assert_parity(case, "chunked", dtype, keep_ratio=keep_ratio, reduction=reduction)
    one_pass = keep_ratio == 1.0 and blocks == "several"
    assert count.calls == one_pass
    bf16_dw = blocks == "one" and bf16_products is True and BF16_MODES
    assert direct == ([] if one_pass else [(blocks == "one", bf16_dw)])


@pytest.mark.parametrize("bf16_products", [False, True])
def test_one_pass_by_tiles_of_bf16_weights(monkeypatch, bf16_products):
    """bf16 plain CE where the backward would not take one block (33 rows, V = 97) and a softcap sends
    the one pass by tiles, here in one block of rows: it writes d W once, in bf16, by a bf16 product
    where bf16 products run."""
    monkeypatch.setattr(products, "BF16_PRODUCTS", bf16_products)
    monkeypatch.setattr(workers, "threads_for", lambda device: 2)
    direct = spy_direct_dw(monkeypatch)
    small_single_pass(monkeypatch, rows=33, cols=16)
    monkeypatch.setattr(chunked, "SINGLE_PASS_BUDGET_OF_LOGITS", 4.0)  # the partial sums of d hidden too
    count = CountSinglePass(monkeypatch, path="tiles")
    case = make_case((3, 11), 24, 97, seed=17, bias=True, softcap=4.0)
    assert_parity(case, "chunked", torch.bfloat16, keep_ratio=1.0, reduction="mean", softcap=4.0)
    assert count.calls == 1
    assert direct == [(True, bf16_products and BF16_MODES)]


@pytest.mark.parametrize(
    "keep_ratio,reduction,one_block", [(1.0, "mean", True), (1.0, "none", False), (0.6, "mean", False)]
)
def test_one_block_allowance_of_plain_ce(keep_ratio, reduction, one_block):
    """33 rows of bf16, D = 24, V = 320, 2 workers: one block's buffers (3 * 12 * 33 * 24 / 2) are
    between one and two fp32 d W's. Plain CE, whose other choice is the one pass holding two, takes
    one block; SLM and reduction "none", whose other choice is several blocks and one d W, do not."""
    case = make_case((3, 11), 24, 320, seed=5)
    bf16 = [None if x is None else x.to(torch.bfloat16) for x in (case.hidden, case.weight)]
    problem = make_problem(
        *bf16, case.targets, None, keep_ratio=keep_ratio, bias=None, ignore_index=IGNORE,
        reduction=reduction, scope="batch", softcap=None,
    )  # fmt: skip
    assert 320 * 24 < 3 * 12 * 33 * 24 / 2 <= chunked.ONE_BLOCK_OF_DW_PLAIN * 320 * 24
    assert (chunked.backward_tile(problem, 33, threads=2)[0] == 33) == one_block


def test_plain_ce_of_16_bit_weights_counts_valid_rows(monkeypatch):
    """Whether the one-block backward fits is judged on the valid rows: 33 tokens, half ignored, fit
    one block at V = 250 (432 elements a row against 2 * 250 * 24, plain CE's allowance), where all
    33 would not."""
    monkeypatch.setattr(workers, "threads_for", lambda device: 2)
    count = CountSinglePass(monkeypatch)
    case = make_case((3, 11), 24, 250, seed=21, ignore_frac=0.5)
    n_valid = int((case.targets != IGNORE).sum())
    assert 432 * n_valid <= chunked.ONE_BLOCK_OF_DW_PLAIN * 250 * 24 < 432 * 33
    assert_parity(case, "chunked", torch.bfloat16, keep_ratio=1.0, reduction="mean")
    assert count.calls == 0
