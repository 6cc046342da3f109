"""Pure-PyTorch backend that never holds more than one tile of logits.

Forward: valid tokens in blocks of rows, the vocabulary in blocks of columns; each tile's
``logsumexp`` is merged into a running one per row and the tile is dropped, giving ``ce``, each
row's largest logit ``m`` and ``s = lse - m``. Selection over the per-token excess (O(N) memory).
Backward: only the kept rows, gathered once per block, recomputing each tile of their logits once,
with ``m`` and ``s`` from the forward,

    d z_i = g_i * (softmax(z_i) - onehot(t_i))            (times 1 - tanh^2 under a softcap)
    d hidden_i = d z_i @ W,   d W = sum_i d z_i^T hidden_i,   d bias = sum_i d z_i

where ``g_i`` is the upstream gradient of token ``i``'s term of the loss. With z-loss ``c``, label
smoothing ``eps`` or a gradient ``g_lse`` of the returned logsumexp, per row,

    d z_i = a_i softmax(z_i) - g_i ((1 - eps) onehot(t_i) + eps / V),   a_i = g_i (1 + 2 c lse_i) + g_lse_i

How it stays near the matmul floor ``(2 + 6 r) N D V`` (measurements in ``bench/NOTES.md``):

- Tiles span many rows and few vocabulary columns, within a memory budget for each pass: every
  product then has long dimensions (``h @ W_c^T``, ``d z_c^T @ h`` over a block of hundreds of
  rows, ``W_c^T @ d z_c^T``), which the GEMM runs near its peak. A block of few rows against the
  whole vocabulary instead makes it re-pack all of ``W`` for a few rows' worth of work. The
  backward's budget is the smaller: it runs while the gradients (``V x D``) are held too.
- On CPU in fp32, products go through oneDNN where this torch has it; it runs these shapes at
  about twice the rate of MKL's ``torch.mm`` on AVX-512 machines.
- Backward tiles are ``[cols, rows]``, so ``-m`` of each row is the product's bias and
  ``exp_((z - m) - s)`` in place gives the softmax; a ``g`` common to all tokens scales the products' outputs,
  never the tile (per-token ``g``, for reduction "none", costs one pass over each tile).
- Rows are views of ``hidden`` when every token is valid; otherwise one gather per block of rows.
  When one block holds every kept row, the backward gathers them into ``d hidden``'s storage,
  which is free until ``d hidden`` is written at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..problem import LossProblem, SelectionStats, reduce_loss, reference_loss, token_term
from ..selection import choose, select_top
from .ops import define

# Working memory of the forward: its two logits-sized buffers (the tile, and log-softmax's output).
# The gradients do not exist yet, so this may be larger than the backward's.
FORWARD_BUDGET_BYTES = 4 * 2**20
# Working memory of the backward beyond the gradients it returns (already V x D + N x D): a block's
# rows of hidden and of d hidden, its tile of logits, and two [cols, D] operands per tile. At least
# BACKWARD_BUDGET_BYTES, and up to BACKWARD_BUDGET_OF_DW of d W's bytes, which the step holds anyway.
BACKWARD_BUDGET_BYTES = 8 * 2**20
BACKWARD_BUDGET_OF_DW = 1 / 8
# Fewest vocabulary columns in a tile: below this, blocks of rows shrink instead.
MIN_TILE_COLS = 64
# Tiles are a multiple of this many columns wide where they can be: oneDNN ran the backward's
# products at ~430 GFLOP/s for 320, 384 or 448 columns, ~300-340 for 372 or 481 (bench/NOTES.md).
TILE_COLS_MULTIPLE = 64


def _cols(n_vocab: int, cols: int) -> int:
    """``cols`` clamped to ``[MIN_TILE_COLS, n_vocab]``, rounded down to a multiple of ``TILE_COLS_MULTIPLE``."""
    cols = max(MIN_TILE_COLS, cols)
    if cols >= TILE_COLS_MULTIPLE:
        cols -= cols % TILE_COLS_MULTIPLE
    return min(n_vocab, cols)


def _even(n: int, most: int) -> int:
    """Rows per block when ``n`` rows go in blocks of at most ``most``, as evenly as possible."""
    blocks = -(-n // max(1, most))
    return max(1, -(-n // max(1, blocks)))


def forward_tile(p: LossProblem, n_rows: int) -> tuple[int, int]:
    """``(rows, cols)`` of a forward tile over ``n_rows`` rows: two of them fit ``FORWARD_BUDGET_BYTES``.

    All rows in one block while that leaves ``MIN_TILE_COLS`` columns; fewer rows beyond.
    """
    elems = max(1, FORWARD_BUDGET_BYTES // (2 * p.compute_dtype.itemsize))
    n_vocab, dim = p.weight.shape[0], max(1, p.weight.shape[1])  # D = 0: logits are the bias alone
    # Columns also bounded by elems // dim: the tile's slice of W, which oneDNN packs per product.
    cols = _cols(n_vocab, min(elems // max(n_rows, 1), elems // dim))
    return _even(n_rows, elems // max(cols, 1)), cols


def backward_tile(p: LossProblem, n_rows: int, row_buffers: int = 3) -> tuple[int, int]:
    """``(rows, cols)`` of a backward tile over ``n_rows`` kept rows, within the backward's budget.

    Working set, in elements: ``row_buffers R D`` (the gathered rows, d hidden^T, each tile's product
    into it; two when the rows live in d hidden's storage) ``+ k R C`` (the tile; k = 2 with a bias
    or softcap) ``+ 2 C D`` (d W_c, and the operand copied for d hidden). The ``[R, D]`` buffers
    take at most two thirds of it; the columns fill the rest.
    """
    n_vocab, dim = p.weight.shape[0], max(1, p.weight.shape[1])  # D = 0: logits are the bias alone
    elems = max(1, BACKWARD_BUDGET_BYTES // p.compute_dtype.itemsize, int(n_vocab * dim * BACKWARD_BUDGET_OF_DW))
    tiles = 1 if p.bias is None and p.softcap is None else 2
    rows = _even(n_rows, 2 * elems // (3 * row_buffers * dim))
    cols = (elems - row_buffers * rows * dim) // (tiles * rows + 2 * dim)
    return rows, _cols(n_vocab, cols)


def _onednn_linear():
    """oneDNN's ``x @ w.T + b`` for dense CPU tensors, or None where this torch build lacks it."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def _linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w.T (+ b)``, ``b`` per column of the result. ``w`` may be a transposed view; ``x`` is contiguous."""
    # oneDNN has no primitive for an empty inner dimension (D = 0)
    if _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and x.shape[1]:
        return _ONEDNN_LINEAR(x, w, b, "none", [], "")
    return x @ w.T if b is None else torch.addmm(b, x, w.T)


def _head(p: LossProblem) -> tuple[Tensor, Tensor | None]:
    """Weight and bias in the compute dtype (no copy for fp32 inputs)."""
    dtype = p.compute_dtype
    return p.weight.to(dtype), None if p.bias is None else p.bias.to(dtype)


def _capped(p: LossProblem, z: Tensor) -> Tensor:
    """``c * tanh(z / c)`` in place under a softcap ``c``; ``z`` unchanged without one."""
    return z if p.softcap is None else z.div_(p.softcap).tanh_().mul_(p.softcap)


def _row_blocks(
    p: LossProblem, idx: Tensor, contiguous: bool, step: int, out: Tensor | None = None
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """``(positions in idx, rows of hidden, targets)`` per block of ``step`` tokens of ``idx``.

    When ``contiguous`` (``idx`` is ``0 .. N-1``) the rows are views of ``hidden``; otherwise one
    gather per block, into the first rows of ``out`` if given.
    """
    for start in range(0, idx.shape[0], step):
        pos = slice(start, min(start + step, idx.shape[0]))
        if contiguous:
            yield pos, p.hidden[pos], p.targets[pos]
        else:
            rows = idx[pos]
            h = torch.index_select(p.hidden, 0, rows, out=None if out is None else out[: len(rows)])
            yield pos, h, p.targets.index_select(0, rows)


def _col_blocks(t: Tensor, n_vocab: int, step: int) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Per block of ``step`` vocabulary columns: its slice, the rows whose target (in ``t``) falls
    in it, and that target's column there. One sort of ``t`` and one host read for all blocks."""
    starts = list(range(0, n_vocab, step))
    sorted_t, order = torch.sort(t, stable=True)
    bounds = torch.searchsorted(sorted_t, torch.tensor([*starts, n_vocab], dtype=t.dtype, device=t.device)).tolist()
    for start, lo, hi in zip(starts, bounds[:-1], bounds[1:], strict=True):
        yield slice(start, min(start + step, n_vocab)), order[lo:hi], sorted_t[lo:hi] - start


def _forward(p: LossProblem) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``(ce, m, s, lse, z_sum)`` per token in the compute dtype, 0 at ignored tokens, which cost nothing.

    ``z_sum = sum_v z_v`` only under label smoothing (else None).

    ``m`` is the largest logit of each row and ``s = logsumexp(z) - m``: the backward forms the
    softmax as ``exp((z - m) - s)``, as PyTorch's ``log_softmax`` does, each subtraction exact or
    small, where ``exp(z - lse)`` would lose an ulp of ``lse``. Per ``[rows, cols]`` tile,
    ``log_softmax`` into the second buffer gives the tile's logsumexp, ``max z - max log_softmax(z)``
    (both at the largest logit, where ``log_softmax`` is nearest 0), merged across tiles in fp64.
    """
    dtype = p.compute_dtype
    n, n_vocab = p.targets.shape[0], p.weight.shape[0]
    ce = torch.zeros(n, dtype=dtype, device=p.hidden.device)
    m, s, lse = torch.zeros_like(ce), torch.zeros_like(ce), torch.zeros_like(ce)
    z_sum = torch.zeros_like(ce) if p.label_smoothing else None
    w, b = _head(p)
    valid = p.valid
    contiguous = bool(valid.all())
    idx = torch.arange(n, device=valid.device) if contiguous else valid.nonzero().squeeze(1)
    step, width = forward_tile(p, idx.shape[0])
    scratch = torch.empty(min(step, idx.shape[0]) * width, dtype=dtype, device=p.hidden.device)
    for pos, h, t in _row_blocks(p, idx, contiguous, step):
        h = h.to(dtype)
        lse_rows = torch.full((h.shape[0],), float("-inf"), dtype=torch.float64, device=h.device)
        m_rows = torch.full_like(lse_rows, float("-inf"), dtype=dtype)
        z_target = torch.zeros_like(m_rows)
        z_sum_rows = torch.zeros_like(m_rows) if z_sum is not None else None
        for cols, hit, col in _col_blocks(t, n_vocab, width):
            z = _capped(p, _linear(h, w[cols], None if b is None else b[cols]))
            z_target[hit] = z[hit, col]
            if z_sum_rows is not None:
                z_sum_rows += z.sum(1)
            log_probs = torch.log_softmax(z, dim=1, out=scratch[: z.numel()].view_as(z))
            z_max = z.amax(1)  # -inf where a bias masks every column of the tile (log_softmax is NaN)
            tile_lse = torch.where(z_max == float("-inf"), z_max, z_max - log_probs.amax(1)).double()
            lse_rows = torch.logaddexp(lse_rows, tile_lse)
            m_rows = torch.maximum(m_rows, z_max)
            del z, log_probs
        rows = pos if contiguous else idx[pos]
        m[rows] = m_rows
        s[rows] = (lse_rows - m_rows).to(dtype)
        ce[rows] = (lse_rows - z_target).to(dtype)
        lse[rows] = lse_rows.to(dtype)
        if z_sum is not None:
            z_sum[rows] = z_sum_rows
    return ce, m, s, lse, z_sum


class _Grads:
    """``d hidden``, ``d W``, ``d bias`` (those needed), accumulated one ``[cols, rows]`` tile at a time.

    A tile holds ``softmax(z_i) - onehot(t_i)`` in column ``i``, times ``g_i`` when ``g`` differs
    per token; a ``g`` common to all tokens (reductions "mean", "sum") scales the products instead.
    The tile is contiguous, the operand layout oneDNN reads best for ``d W_c = tile @ h``;
    ``(d h)^T = W_c^T @ tile`` copies one operand per tile.
    """

    def __init__(self, p: LossProblem, w: Tensor, b: Tensor | None, needs: tuple[bool, ...]) -> None:
        """``w``, ``b``: the head in the compute dtype, converted once for the whole backward."""
        dtype, (n_vocab, dim) = p.compute_dtype, w.shape
        self.p, self.w, self.b = p, w, b
        self.dh = torch.zeros_like(p.hidden) if needs[0] else None
        self.rows_in_dh = False
        # d W is written by the first block of rows and added to by the others (no zero fill).
        self.dw = torch.empty(n_vocab, dim, dtype=dtype, device=w.device) if needs[1] else None
        self.db = torch.zeros(n_vocab, dtype=dtype, device=w.device) if needs[2] else None
        self.first_block = True

    def start_rows(self, h: Tensor, scale: Tensor) -> None:
        """A block of rows ``h`` begins; ``scale``: the common ``g`` ([1]), or ones when the tile holds ``g``."""
        self.h, self.scale = h, scale
        self.dh_t = h.new_zeros(h.shape[1], h.shape[0]) if self.dh is not None else None

    def add(self, dz_t: Tensor, cols: slice) -> None:
        """One tile ``[cols, rows]``, contiguous."""
        if self.dh_t is not None:
            # oneDNN reads a transposed weight but wants its input contiguous: copy the smaller
            # of the tile (as d z) and the slice of W (as W_c^T).
            if dz_t.shape[1] < self.w.shape[1]:
                self.dh_t.add_(_linear(dz_t.T.contiguous(), self.w[cols].T).T)
            else:
                self.dh_t.add_(_linear(self.w[cols].T.contiguous(), dz_t.T))
        if self.dw is not None:
            dw_tile = _linear(dz_t, self.h.T)
            if self.first_block:
                torch.mul(dw_tile, self.scale, out=self.dw[cols])
            else:
                self.dw[cols].addcmul_(dw_tile, self.scale)
        if self.db is not None:
            self.db[cols].addcmul_(dz_t.sum(1), self.scale)

    def end_rows(self, rows: Tensor) -> None:
        """The current block of rows is done: its ``d hidden`` goes to token indices ``rows``."""
        if self.dh is not None:
            dh = self.dh_t.T * self.scale
            if self.rows_in_dh:  # the gathered rows are no longer needed
                self.dh.zero_()
            self.dh[rows] = dh.to(self.dh.dtype)
        self.first_block = False

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients in the inputs' dtypes."""
        if self.first_block and self.dw is not None:  # no kept row: d W was never written
            self.dw.zero_()
        return (
            self.dh,
            None if self.dw is None else self.dw.to(self.p.weight.dtype),
            None if self.db is None else self.db.to(self.p.bias.dtype),
        )


def _backward(
    p: LossProblem, m: Tensor, s: Tensor, kept_idx: Tensor, g: Tensor, grads: _Grads, a: Tensor | None = None
) -> None:
    """Gradients of ``sum_i g_i * ce_i`` over the rows ``kept_idx``: ``g`` aligned with them, or one
    value ``[1]`` common to all. With ``a`` (aligned with the rows, ``g`` then too), the gradients of
    ``d z_i = a_i softmax - g_i ((1 - eps) onehot + eps / V)``: z-loss, smoothing, lse's gradient.

    Tiles are ``[cols, rows]``: ``W_c @ h^T`` takes ``-m_i`` (the row's largest logit, from the
    forward) as the bias of column ``i``; then ``exp((z - m) - s)`` in place gives the softmax.
    With a bias or a softcap, which come first, ``- m`` is a pass of its own.
    """
    dtype = p.compute_dtype
    w, b = grads.w, grads.b
    n_kept = kept_idx.shape[0]
    common = g.numel() == 1 and a is None
    scale = g if common else g.new_ones(1)
    eps, n_vocab = p.label_smoothing, w.shape[0]
    # When one block holds every kept row, d hidden's storage can hold the gathered rows until
    # d hidden is written: one [rows, D] buffer fewer in the budget.
    step, width = backward_tile(p, n_kept, 2)
    grads.rows_in_dh = grads.dh is not None and grads.dh.dtype == dtype and step == n_kept
    if not grads.rows_in_dh:
        step, width = backward_tile(p, n_kept, 3)
    for pos, h, t in _row_blocks(p, kept_idx, False, step, out=grads.dh if grads.rows_in_dh else None):
        h = h.to(dtype)
        rows = kept_idx[pos]
        neg_m, s_rows = -m[rows], s[rows]
        grads.start_rows(h, scale)
        for cols, hit, col in _col_blocks(t, w.shape[0], width):
            if b is None and p.softcap is None:
                z_t = None
                dz_t = _linear(w[cols], h, neg_m).sub_(s_rows).exp_()  # softmax^T
            else:
                z_t = _linear(w[cols], h)
                if b is not None:
                    z_t.add_(b[cols, None])
                z_t = _capped(p, z_t)
                dz_t = torch.add(z_t, neg_m).sub_(s_rows).exp_()
            if a is None:
                dz_t[col, hit] -= 1.0
                if not common:
                    dz_t.mul_(g[pos])
            else:
                g_rows = g[pos]
                dz_t.mul_(a[pos])
                dz_t[col, hit] -= (1 - eps) * g_rows[hit]
                if eps:
                    dz_t.sub_((eps / n_vocab) * g_rows)
            if z_t is not None and p.softcap is not None:  # d cap(u) / du = 1 - tanh^2, tanh = z / c
                dz_t.mul_(z_t.div_(p.softcap).square_().neg_().add_(1.0))
            grads.add(dz_t, cols)
            del z_t, dz_t
        grads.end_rows(rows)


def _top_k(p: LossProblem):
    """Top-k within each selection group of ``p`` (the flattened tokens), for `choose`."""

    def top_k(score: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kept, threshold, n_keep, n_valid = select_top(
            score.view(p.group_shape), valid.view(p.group_shape), p.keep_ratio
        )
        return kept.reshape(-1), threshold, n_keep, n_valid

    return top_k


def loss_forward(p: LossProblem) -> tuple[Tensor, ...]:
    """Steps 1 to 6: ``(loss, ce, excess, kept, threshold, n_kept, n_valid, weight, weight_sum, lse, aux)``,
    ``aux = [m; s]``."""
    ce, m, s, lse, z_sum = _forward(p)
    valid = p.valid
    ref = reference_loss(p)
    excess = ce.clone() if ref is None else torch.where(valid, ce - ref, torch.zeros_like(ce))
    kept, threshold, n_kept, n_valid, weight, weight_sum = choose(p, excess, valid, _top_k(p))
    term = token_term(p, ce, lse, z_sum)
    per_token = torch.where(kept, term * weight if p.weighted else term, torch.zeros_like(ce))
    loss = reduce_loss(p, per_token, weight_sum)
    return loss, ce, excess, kept, threshold, n_kept, n_valid, weight, weight_sum, lse, torch.stack([m, s])


def loss_backward(
    p: LossProblem, lse: Tensor, aux: Tensor, rows: Tensor, g: Tensor, g_lse: Tensor | None, needs: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Step 7 over the rows of ``rows``, from the forward's ``lse`` and ``aux = [m; s]``."""
    idx = rows.nonzero().squeeze(1)
    if g.numel() > 1:
        g = g[idx]
    a = None
    if p.z_loss or p.label_smoothing or g_lse is not None:  # per-row coefficients of the softmax
        g = g.expand(idx.shape[0])
        a = g * (1 + 2 * p.z_loss * lse[idx]) if p.z_loss else g
        if g_lse is not None:
            a = a + g_lse[idx]
    grads = _Grads(p, *_head(p), needs)
    _backward(p, aux[0], aux[1], idx, g, grads, a)
    return grads.result()


_OPS = define(
    "chunked",
    loss_forward,
    loss_backward,
    lambda p: _forward(p)[0].float(),
    lambda hidden: hidden.new_empty(2, hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32)),
)


def selective_loss(p: LossProblem) -> tuple[Tensor, Tensor, SelectionStats]:
    """The contract's loss; autograd runs the kept-rows-only backward."""
    return _OPS.selective_loss(p)


def token_losses(p: LossProblem) -> Tensor:
    """Per-token cross-entropy, fp32, 0 at ignored tokens; one tile of logits at a time."""
    return _OPS.token_losses(p)
