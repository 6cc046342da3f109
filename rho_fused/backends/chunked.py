"""Pure-PyTorch backend that never holds the ``[N, V]`` logits.

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

Plain cross-entropy (every valid token kept, reduction "mean" or "sum") with a gradient needed
takes one pass instead (`loss_single_pass`): a block of rows' logits over the whole vocabulary is
held while its gradients are formed, ``6 N D V`` flops instead of ``8 N D V``; the backward then
scales them by the upstream gradient.

How it stays near the matmul floor ``(2 + 6 r) N D V`` (measurements in ``bench/NOTES.md``):

- The tiles of a block are work items for `workers`: as many threads as ``torch.get_num_threads()``,
  one OpenMP thread each, taking the next tile when done. Beside a busy process, an operator
  split across all threads waits at its end for a descheduled one, and thousands of them did.
  Items write their own slots, merged in tile order, so results are bitwise those of one thread.
- Tiles span many rows and few vocabulary columns, within a memory budget for each pass: every
  product then has long dimensions (``h @ W_c^T``, ``d z_c^T @ h`` over a block of hundreds of
  rows, ``W_c^T @ d z_c^T``), which the GEMM runs near its peak. The backward's budget is the
  smaller: it runs while the gradients (``V x D``) are held too.
- ``d W`` and ``d hidden`` accumulate in place (``addmm_``) unless oneDNN's product then an add is
  faster on this CPU (measured once per process, `products.in_place`): oneDNN ran fp32 products
  about twice as fast as MKL on AMD EPYC, and even with it on Intel Xeon.
- bf16 inputs are computed in fp32, their products in bf16 with fp32 sums on a CPU with bf16 units
  (`products.bf16_products`): 2-3x the fp32 rate on AMX.
- Backward tiles are ``[cols, rows]``, so ``-m`` of each row is the product's bias and
  ``exp_((z - m) - s)`` in place gives the softmax; a ``g`` common to all tokens scales the sums
  once at the end (or ``d W_c`` as it is written, when written once), never the tile (per-token
  ``g``, for reduction "none", costs one pass over each tile).
- Rows are views of ``hidden`` when every token is valid; otherwise one gather per block of rows.
  When one block holds every kept row, the backward gathers them into ``d hidden``'s storage,
  which is free until ``d hidden`` is written at the end.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..problem import LossProblem, SelectionStats, reduce_loss, reference_loss, token_term, upstream
from ..selection import choose, select_top
from . import products, workers
from .ops import define

# Working memory of the forward, all workers together: each worker's tile of logits and its
# logsumexp's temporary. The gradients do not exist yet, so this may be larger than the backward's.
FORWARD_BUDGET_BYTES = 4 * 2**20
# Working memory of the backward beyond the gradients it returns (already V x D + N x D): a block's
# rows of hidden, the partial sums of d hidden, and per worker its tile of logits, its product into
# d hidden and two [cols, D] operands. At least BACKWARD_BUDGET_BYTES, and up to
# BACKWARD_BUDGET_OF_DW of d W's bytes, which the step holds anyway.
BACKWARD_BUDGET_BYTES = 8 * 2**20
BACKWARD_BUDGET_OF_DW = 1 / 8
# The one-pass path (every valid token kept, gradients formed in the forward) holds blocks of rows'
# logits over the whole vocabulary (one per worker and one more, by rows; one, by tiles): in all
# SINGLE_PASS_BUDGET_BYTES, or up to d W's bytes (SINGLE_PASS_BUDGET_OF_DW) if more, but at most
# SINGLE_PASS_BUDGET_OF_LOGITS of all N x V logits' (naive PyTorch's step holds two to three times
# those), and at least SINGLE_PASS_SMALL_BYTES. It is taken when a block then has
# MIN_SINGLE_PASS_ROWS rows (or all of them): with fewer, re-reading W for every block cost more
# than the recompute it saves (bench/NOTES.md).
SINGLE_PASS_BUDGET_BYTES = 64 * 2**20
SINGLE_PASS_BUDGET_OF_DW = 1.0
SINGLE_PASS_BUDGET_OF_LOGITS = 1 / 5
SINGLE_PASS_SMALL_BYTES = 4 * 2**20
MIN_SINGLE_PASS_ROWS = 128
# Elements of one tile of the one-pass path: its columns are this over the block's rows.
SINGLE_PASS_TILE_ELEMS = 2**19
# With weights narrower than the compute dtype (bf16, fp16), the backward takes every kept row in one block,
# and writes d W once in the weight's dtype, while that block's buffers are at most this fraction of
# an fp32 d W, which several blocks would sum into.
ONE_BLOCK_OF_DW = 1.0
# The same for plain cross-entropy where its one pass would run instead (`_one_pass_fits`): that pass
# holds d W in the compute dtype and its blocks' logits (by rows, the head in the compute dtype too),
# about two fp32 d W's or more.
ONE_BLOCK_OF_DW_PLAIN = 2.0
# d hidden is summed over the vocabulary's tiles in this many fixed groups of tiles, one partial sum
# each, added in order at the end: the groups are the backward's work items, and the sum does not
# depend on which worker ran which group.
DH_GROUPS = 8
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


def _plain(p: LossProblem) -> bool:
    """Whether every valid token is kept with weight 1 and the upstream gradient is one value: plain
    cross-entropy (``keep_ratio=1``), reduction "mean" or "sum", within one process's tokens."""
    plain = p.keep_ratio >= 1 and p.selection == "topk" and not p.weighted
    return plain and p.reduction != "none" and p.scope != "global"


def forward_tile(p: LossProblem, n_rows: int, threads: int = 1) -> tuple[int, int]:
    """``(rows, cols)`` of a forward tile over ``n_rows`` rows: ``2 * threads`` of them fit ``FORWARD_BUDGET_BYTES``.

    All rows in one block while that leaves ``MIN_TILE_COLS`` columns; fewer rows beyond.
    """
    elems = max(1, FORWARD_BUDGET_BYTES // (2 * threads * p.compute_dtype.itemsize))
    n_vocab, dim = p.weight.shape[0], max(1, p.weight.shape[1])  # D = 0: logits are the bias alone
    # Columns also bounded by elems // dim: the tile's slice of W, which oneDNN packs per product.
    cols = _cols(n_vocab, min(elems // max(n_rows, 1), elems // dim))
    return _even(n_rows, elems // max(cols, 1)), cols


def backward_tile(p: LossProblem, n_rows: int, row_buffers: int = 2 + DH_GROUPS, threads: int = 1) -> tuple[int, int]:
    """``(rows, cols)`` of a backward tile over ``n_rows`` kept rows, within the backward's budget.

    Working set, in elements: ``row_buffers R D`` (the gathered rows, the partial sums of
    d hidden^T; one fewer when the rows live in d hidden's storage) and, per worker, ``k R C``
    (the tile; k = 2 with a bias or softcap) ``+ R D`` (its product into d hidden) ``+ 2 C D``
    (d W_c, and the operand copied for d hidden; for a 16-bit weight, ``W_c`` in the compute dtype
    and the product ``d W_c`` before its rounding, or ``d z`` in bf16). The ``[R, D]`` buffers take
    at most two thirds of it; the columns fill the rest.

    With a weight narrower than the compute dtype (bf16, fp16), every row goes in one block when that
    block's buffers take no more than ``ONE_BLOCK_OF_DW`` of the wider ``d W`` that several blocks
    would sum into (``ONE_BLOCK_OF_DW_PLAIN`` where plain cross-entropy's one pass is the other
    choice): ``d W`` is then written once, in the weight's dtype (`_Grads`).
    """
    n_vocab, dim = p.weight.shape[0], max(1, p.weight.shape[1])  # D = 0: logits are the bias alone
    elems = max(1, BACKWARD_BUDGET_BYTES // p.compute_dtype.itemsize, int(n_vocab * dim * BACKWARD_BUDGET_OF_DW))
    tiles = 1 if p.bias is None and p.softcap is None else 2
    buffers = row_buffers + threads
    one_block = -(-3 * buffers * n_rows * dim // 2)
    allowance = ONE_BLOCK_OF_DW_PLAIN if _plain(p) and _one_pass_fits(p) else ONE_BLOCK_OF_DW
    if p.weight.dtype.itemsize < p.compute_dtype.itemsize and one_block <= allowance * n_vocab * dim:
        elems = max(elems, one_block)
    rows = _even(n_rows, 2 * elems // (3 * buffers * dim))
    cols = (elems - buffers * rows * dim) // (threads * (tiles * rows + 2 * dim))
    return rows, _cols(n_vocab, cols)


def _backward_plan(p: LossProblem, n_kept: int, threads: int, dh_can_hold_rows: bool) -> tuple[int, int, bool]:
    """``(rows, cols, rows_in_dh)`` of `_backward` over ``n_kept`` rows. When one block holds every
    kept row and d hidden is in the compute dtype (``dh_can_hold_rows``), d hidden's storage holds
    the gathered rows until it is written: one ``[rows, D]`` buffer fewer in the budget."""
    if dh_can_hold_rows:
        rows, cols = backward_tile(p, n_kept, 1 + DH_GROUPS, threads)
        if rows == n_kept:
            return rows, cols, True
    return (*backward_tile(p, n_kept, 2 + DH_GROUPS, threads), False)


def _single_pass_budget(p: LossProblem, n_rows: int) -> int:
    """Bytes the one-pass path may hold over ``n_rows`` rows (see ``SINGLE_PASS_BUDGET_BYTES``)."""
    n_vocab, dim = p.weight.shape
    size = p.compute_dtype.itemsize
    budget = max(SINGLE_PASS_BUDGET_BYTES, int(n_vocab * dim * size * SINGLE_PASS_BUDGET_OF_DW))
    return max(SINGLE_PASS_SMALL_BYTES, min(budget, int(n_rows * n_vocab * size * SINGLE_PASS_BUDGET_OF_LOGITS)))


def single_pass_tile(p: LossProblem, n_rows: int) -> tuple[int, int]:
    """``(rows, cols)`` of the one-pass path by tiles over ``n_rows`` rows: a block's logits over the
    whole vocabulary, and its partial sums of d hidden, fit `_single_pass_budget`.
    """
    n_vocab, dim = p.weight.shape
    size = p.compute_dtype.itemsize
    rows = _even(n_rows, _single_pass_budget(p, n_rows) // (size * max(1, n_vocab + (DH_GROUPS + 1) * dim)))
    return rows, _cols(n_vocab, SINGLE_PASS_TILE_ELEMS // max(rows, 1))


def _one_pass_fits(p: LossProblem) -> bool:
    """Whether blocks of plain cross-entropy's one pass have ``MIN_SINGLE_PASS_ROWS`` rows, or all of them."""
    n = p.targets.shape[0]
    return single_pass_tile(p, n)[0] >= min(n, MIN_SINGLE_PASS_ROWS)


def _bias(p: LossProblem) -> Tensor | None:
    """The bias in the compute dtype (no copy for fp32 inputs)."""
    return None if p.bias is None else p.bias.to(p.compute_dtype)


def _capped(p: LossProblem, z: Tensor) -> Tensor:
    """``c * tanh(z / c)`` in place under a softcap ``c``; ``z`` unchanged without one."""
    return z if p.softcap is None else z.div_(p.softcap).tanh_().mul_(p.softcap)


def _valid_rows(p: LossProblem) -> tuple[Tensor, bool]:
    """``(idx, contiguous)``: the valid tokens' indices, and whether they are all of ``0 .. N-1``."""
    valid = p.valid
    contiguous = bool(valid.all())
    return (torch.arange(valid.shape[0], device=valid.device) if contiguous else valid.nonzero().squeeze(1)), contiguous


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


def _col_blocks(t: Tensor, n_vocab: int, step: int) -> list[tuple[slice, Tensor, Tensor]]:
    """Per block of ``step`` vocabulary columns: its slice, the rows whose target (in ``t``) falls
    in it, and that target's column there. One sort of ``t`` and one host read for all blocks."""
    starts = list(range(0, n_vocab, step))
    sorted_t, order = torch.sort(t, stable=True)
    bounds = torch.searchsorted(sorted_t, torch.tensor([*starts, n_vocab], dtype=t.dtype, device=t.device)).tolist()
    return [
        (slice(start, min(start + step, n_vocab)), order[lo:hi], sorted_t[lo:hi] - start)
        for start, lo, hi in zip(starts, bounds[:-1], bounds[1:], strict=True)
    ]


def _groups(n_tiles: int) -> list[range]:
    """The tiles ``0 .. n_tiles - 1`` in at most `DH_GROUPS` contiguous groups of near-equal size."""
    n = min(DH_GROUPS, n_tiles)
    bounds = [k * n_tiles // n for k in range(n + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _logits_t(p: LossProblem, w_c: Tensor, b: Tensor | None, h: Tensor, cols: slice) -> Tensor:
    """The tile ``[cols, rows]`` of logits, ``W_c h^T (+ b_c)``, softcapped; ``w_c``: ``W_c`` in the compute dtype."""
    z_t = products.linear(w_c, h)
    if b is not None:
        z_t.add_(b[cols, None])
    return _capped(p, z_t)


class _Stats:
    """Per row of a block: the largest logit ``m``, ``lse``, the target's logit and ``sum_v z_v``,
    from per-tile slots that any worker writes, merged in tile order (in fp64 for ``lse``).

    A tile's logsumexp is ``m + log sum exp(z - m)``, ``m`` its largest logit per row, as PyTorch's
    ``log_softmax`` forms it; in place in the tile when the caller drops it after (``scratch``).
    """

    def __init__(self, p: LossProblem, n_tiles: int, n_rows: int, device: torch.device) -> None:
        dtype = p.compute_dtype
        self.tile_max = torch.empty(n_tiles, n_rows, dtype=dtype, device=device)
        self.tile_lse = torch.empty(n_tiles, n_rows, dtype=torch.float64, device=device)
        self.z_target = torch.zeros(n_rows, dtype=dtype, device=device)
        self.tile_sum = torch.empty(n_tiles, n_rows, dtype=dtype, device=device) if p.label_smoothing else None

    def add(self, k: int, z: Tensor, hit: Tensor, col: Tensor, dim: int, scratch: bool = False) -> None:
        """Tile ``k``'s logits ``z``, rows along ``dim`` (0: ``[rows, cols]``, 1: ``[cols, rows]``);
        ``hit``, ``col``: the rows whose target it holds, and where; ``scratch``: ``z`` may be overwritten."""
        z_rows = z if dim == 0 else z.T
        self.z_target[hit] = z_rows[hit, col]
        if self.tile_sum is not None:
            self.tile_sum[k] = z_rows.sum(1)
        z_max = z.amax(1 - dim, keepdim=True)  # -inf where a bias masks every column of the tile
        shifted = z.sub_(z_max) if scratch else z - z_max
        log_sum = shifted.exp_().sum(1 - dim).log_()
        z_max = z_max.squeeze(1 - dim)
        self.tile_max[k] = z_max
        self.tile_lse[k] = torch.where(z_max == float("-inf"), z_max, z_max + log_sum).double()

    def merge(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(m, lse (fp64), z_target, z_sum)`` of each row."""
        lse = torch.full_like(self.tile_lse[0], float("-inf"))
        z_sum = None if self.tile_sum is None else torch.zeros_like(self.tile_sum[0])
        for k in range(self.tile_lse.shape[0]):
            lse = torch.logaddexp(lse, self.tile_lse[k])
            if z_sum is not None:
                z_sum += self.tile_sum[k]
        return self.tile_max.amax(0), lse, self.z_target, z_sum


def _forward(p: LossProblem) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``(ce, m, s, lse, z_sum)`` per token in the compute dtype, 0 at ignored tokens, which cost nothing.

    ``z_sum = sum_v z_v`` only under label smoothing (else None).

    ``m`` is the largest logit of each row and ``s = logsumexp(z) - m``: the backward forms the
    softmax as ``exp((z - m) - s)``, as PyTorch's ``log_softmax`` does, each subtraction exact or
    small, where ``exp(z - lse)`` would lose an ulp of ``lse``. Each ``[rows, cols]`` tile gives its
    largest logit and logsumexp per row (the workers' items); they merge in tile order, in fp64.
    """
    dtype = p.compute_dtype
    n, n_vocab = p.targets.shape[0], p.weight.shape[0]
    ce = torch.zeros(n, dtype=dtype, device=p.hidden.device)
    m, s, lse = torch.zeros_like(ce), torch.zeros_like(ce), torch.zeros_like(ce)
    z_sum = torch.zeros_like(ce) if p.label_smoothing else None
    w, b = p.weight, _bias(p)  # W converted tile by tile: no copy of the whole head
    idx, contiguous = _valid_rows(p)
    threads = workers.threads_for(p.hidden.device)
    step, width = forward_tile(p, idx.shape[0], threads)
    for pos, h, t in _row_blocks(p, idx, contiguous, step):
        h = h.to(dtype)
        tiles = _col_blocks(t, n_vocab, width)
        stats = _Stats(p, len(tiles), h.shape[0], h.device)

        def item(k: int, h: Tensor = h, tiles: list = tiles, stats: _Stats = stats) -> None:
            cols, hit, col = tiles[k]
            z = products.linear(h, w[cols].to(dtype), None if b is None else b[cols])
            stats.add(k, _capped(p, z), hit, col, 0, scratch=True)

        workers.run(item, len(tiles), threads)
        m_rows, lse_rows, z_target, z_sum_rows = stats.merge()
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
    per token; a ``g`` common to all tokens (reductions "mean", "sum") scales the sums once instead
    (``d hidden`` per block, ``d W`` and ``d b`` at the end; ``d W_c`` as it is written when it is
    written once, in the weight's dtype). In place, ``d W_c += tile @ h`` and
    ``(d h)^T += W_c^T @ tile``; through oneDNN, the tile is the operand layout it reads best for
    ``d W_c``, and ``(d h)^T`` copies one operand per tile. Tiles of different columns may run on
    different workers: ``d W_c`` and ``d b_c`` are theirs alone, and ``(d h)^T`` has one partial
    sum per group of tiles (`_groups`), added in order by `end_rows`.

    ``d W_c`` written once from bf16 inputs where the CPU multiplies bf16 (`products.bf16_available`)
    is one product of bf16 operands, ``round(g d z)^T h``, at the bf16 rate, with an fp32
    accumulator and one rounding of the result: PyTorch's bf16 backward rounds ``g d z`` and
    ``d W`` so too.
    """

    def __init__(self, p: LossProblem, w: Tensor, b: Tensor | None, needs: tuple[bool, ...]) -> None:
        """``w``: the weight as given (its tiles are converted by the caller); ``b``: the bias in the
        compute dtype."""
        dtype = p.compute_dtype
        self.p, self.w, self.b, self.needs_dw = p, w, b, needs[1]
        self.dh = torch.zeros_like(p.hidden) if needs[0] else None
        self.rows_in_dh = False
        # d W: allocated by the first block of rows, which writes it, and added to by the others (no
        # zero fill); in the weight's dtype when one block has every row (`direct_dw`).
        self.dw: Tensor | None = None
        self.direct_dw = False
        self.db = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if needs[2] else None
        self.first_block = True
        self.in_place = products.in_place(w.device, dtype)
        self.h_bf16: Tensor | None = None  # the rows, where d W_c is one bf16 product

    def start_rows(self, h: Tensor, h_input: Tensor, scale: Tensor, n_groups: int, last: bool) -> None:
        """A block of rows ``h`` (in the compute dtype; ``h_input``: as given) begins (``last``: no other
        follows); ``scale``: the common ``g`` ([1]), or ones when the tile holds ``g``."""
        self.h, self.scale = h, scale
        self.dh_t = h.new_zeros(n_groups, h.shape[1], h.shape[0]) if self.dh is not None else None
        if self.first_block and self.needs_dw:
            # d W written once needs no wider accumulator: each tile is scaled and rounded once.
            self.direct_dw = last and self.w.dtype != self.p.compute_dtype
            dtype = self.w.dtype if self.direct_dw else self.p.compute_dtype
            self.dw = torch.empty(self.w.shape, dtype=dtype, device=self.w.device)
            if self.direct_dw and products.bf16_available(self.p.hidden, self.w):
                self.h_bf16 = h_input

    def _direct_dw(self, dz_t: Tensor, cols: slice) -> None:
        """``d W_c = g d z^T h``, written once in the weight's dtype."""
        if self.h_bf16 is not None:
            dz_bf16 = torch.empty(dz_t.shape, dtype=torch.bfloat16, device=dz_t.device)
            torch.mm(torch.mul(dz_t, self.scale, out=dz_bf16), self.h_bf16, out=self.dw[cols])
        elif self.in_place:
            self.dw[cols] = torch.mm(dz_t, self.h).mul_(self.scale)
        else:
            self.dw[cols] = products.linear(dz_t, self.h.T).mul_(self.scale)

    def add(self, dz_t: Tensor, cols: slice, group: int, w_c: Tensor) -> None:
        """One tile ``[cols, rows]``, contiguous, of group ``group``; ``w_c``: ``W_c`` in the compute dtype."""
        if self.in_place:
            if self.dh_t is not None:
                self.dh_t[group].addmm_(w_c.T, dz_t)
            if self.dw is not None:
                if self.direct_dw:
                    self._direct_dw(dz_t, cols)
                elif self.first_block:
                    torch.mm(dz_t, self.h, out=self.dw[cols])
                else:
                    self.dw[cols].addmm_(dz_t, self.h)
        else:
            if self.dh_t is not None:
                # oneDNN reads a transposed weight but wants its input contiguous: copy the smaller
                # of the tile (as d z) and the slice of W (as W_c^T).
                if dz_t.shape[1] < w_c.shape[1]:
                    self.dh_t[group].add_(products.linear(dz_t.T.contiguous(), w_c.T).T)
                else:
                    self.dh_t[group].add_(products.linear(w_c.T.contiguous(), dz_t.T))
            if self.dw is not None:
                if self.direct_dw:
                    self._direct_dw(dz_t, cols)
                elif self.first_block:
                    self.dw[cols].copy_(products.linear(dz_t, self.h.T))
                else:
                    self.dw[cols].add_(products.linear(dz_t, self.h.T))
        if self.db is not None:
            self.db[cols].add_(dz_t.sum(1))

    def end_rows(self, rows: Tensor | slice) -> None:
        """The current block of rows is done: its ``d hidden`` goes to token indices ``rows``."""
        if self.dh is not None:
            dh = self.dh_t.sum(0).T * self.scale
            if self.rows_in_dh:  # the gathered rows are no longer needed
                self.dh.zero_()
            self.dh[rows] = dh.to(self.dh.dtype)
        self.first_block = False

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients in the inputs' dtypes."""
        if self.needs_dw and self.dw is None:  # no kept row: d W was never written
            self.dw = torch.zeros(self.w.shape, dtype=self.w.dtype, device=self.w.device)
        if not self.first_block:  # d W and d b are sums over tiles without the common g: one pass
            for x in (None if self.direct_dw else self.dw, self.db):
                if x is not None:
                    x.mul_(self.scale)
        return (
            self.dh,
            None if self.dw is None else self.dw.to(self.p.weight.dtype),
            None if self.db is None else self.db.to(self.p.bias.dtype),
        )


def _coefficients(p: LossProblem, g: Tensor, lse: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(g, a)`` for rows of logsumexp ``lse``: ``a = g (1 + 2 c lse)`` (``g`` expanded to the rows)
    under z-loss ``c`` or label smoothing, else ``(g, None)``: see `_backward`."""
    if not (p.z_loss or p.label_smoothing):
        return g, None
    g = g.expand(lse.shape[0])
    return g, g * (1 + 2 * p.z_loss * lse) if p.z_loss else g


def _dz_tile(
    p: LossProblem, dz_t: Tensor, z_t: Tensor | None, hit: Tensor, col: Tensor, g: Tensor, a: Tensor | None,
    common: bool,
) -> Tensor:  # fmt: skip
    """The softmax tile ``dz_t`` ``[cols, rows]`` made ``d z^T`` in place (see `_backward`); ``z_t``:
    the capped logits, needed under a softcap. ``g``, ``a``: the block's rows' (or the common ``g``)."""
    if a is None:
        dz_t[col, hit] -= 1.0
        if not common:
            dz_t.mul_(g)
    else:
        dz_t.mul_(a)
        dz_t[col, hit] -= (1 - p.label_smoothing) * g[hit]
        if p.label_smoothing:
            dz_t.sub_((p.label_smoothing / p.weight.shape[0]) * g)
    if z_t is not None and p.softcap is not None:  # d cap(u) / du = 1 - tanh^2, tanh = z / c
        dz_t.mul_(z_t.div_(p.softcap).square_().neg_().add_(1.0))
    return dz_t


def _backward(
    p: LossProblem, m: Tensor, s: Tensor, kept_idx: Tensor, g: Tensor, grads: _Grads, a: Tensor | None = None
) -> None:
    """Gradients of ``sum_i g_i * ce_i`` over the rows ``kept_idx``: ``g`` aligned with them, or one
    value ``[1]`` common to all. With ``a`` (aligned with the rows, ``g`` then too), the gradients of
    ``d z_i = a_i softmax - g_i ((1 - eps) onehot + eps / V)``: z-loss, smoothing, lse's gradient.

    Tiles are ``[cols, rows]``: ``W_c @ h^T`` takes ``-m_i`` (the row's largest logit, from the
    forward) as the bias of column ``i``; then ``exp((z - m) - s)`` in place gives the softmax.
    With a bias or a softcap, which come first, ``- m`` is a pass of its own. The workers' items
    are the groups of tiles of a block of rows.
    """
    dtype = p.compute_dtype
    w, b = grads.w, grads.b
    n_kept = kept_idx.shape[0]
    common = g.numel() == 1 and a is None
    scale = g if common else g.new_ones(1)
    threads = workers.threads_for(p.hidden.device)
    dh_can_hold_rows = grads.dh is not None and grads.dh.dtype == dtype
    step, width, grads.rows_in_dh = _backward_plan(p, n_kept, threads, dh_can_hold_rows)
    for pos, h_input, t in _row_blocks(p, kept_idx, False, step, out=grads.dh if grads.rows_in_dh else None):
        h = h_input.to(dtype)
        rows = kept_idx[pos]
        neg_m, s_rows = -m[rows], s[rows]
        g_rows = g if common else g[pos]
        a_rows = None if a is None else a[pos]
        tiles = _col_blocks(t, w.shape[0], width)
        groups = _groups(len(tiles))
        grads.start_rows(h, h_input, scale, len(groups), pos.stop == n_kept)

        def item(j: int, h=h, neg_m=neg_m, s_rows=s_rows, g_rows=g_rows, a_rows=a_rows, tiles=tiles, groups=groups):
            for k in groups[j]:
                cols, hit, col = tiles[k]
                w_c = w[cols].to(dtype)
                if b is None and p.softcap is None:
                    z_t = None
                    dz_t = products.linear(w_c, h, neg_m).sub_(s_rows).exp_()  # softmax^T
                else:
                    z_t = _logits_t(p, w_c, b, h, cols)
                    dz_t = torch.add(z_t, neg_m).sub_(s_rows).exp_()
                grads.add(_dz_tile(p, dz_t, z_t, hit, col, g_rows, a_rows, common), cols, j, w_c)

        workers.run(item, len(groups), threads)
        grads.end_rows(rows)


def _single_pass(p: LossProblem, g: Tensor, grads: _Grads) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """`_forward`'s ``(ce, m, s, lse, z_sum)`` and, into ``grads``, the gradients of every valid row for
    the upstream ``g`` (``[1]``, common to all rows), from each block's logits held once: ``6 N D V``
    flops where `_forward` then `_backward` take ``8 N D V``.

    Per block of rows (`single_pass_tile`), the workers first form every ``[cols, rows]`` tile of
    logits and its row statistics (as `_forward`), then, in groups of tiles, turn each into
    ``d z^T`` in place (as `_backward`, with ``a_i = g (1 + 2 c lse_i)`` under z-loss or smoothing).
    """
    dtype = p.compute_dtype
    n, n_vocab = p.targets.shape[0], p.weight.shape[0]
    ce = torch.zeros(n, dtype=dtype, device=p.hidden.device)
    m, s, lse = torch.zeros_like(ce), torch.zeros_like(ce), torch.zeros_like(ce)
    z_sum = torch.zeros_like(ce) if p.label_smoothing else None
    w, b = grads.w, grads.b
    idx, contiguous = _valid_rows(p)
    threads = workers.threads_for(p.hidden.device)
    step, width = single_pass_tile(p, idx.shape[0])
    for pos, h_input, t in _row_blocks(p, idx, contiguous, step):
        h = h_input.to(dtype)
        tiles = _col_blocks(t, n_vocab, width)
        stats = _Stats(p, len(tiles), h.shape[0], h.device)
        logits: list[Tensor | None] = [None] * len(tiles)

        def first(k: int, h: Tensor = h, tiles: list = tiles, stats: _Stats = stats, logits: list = logits) -> None:
            cols, hit, col = tiles[k]
            logits[k] = _logits_t(p, w[cols].to(dtype), b, h, cols)
            stats.add(k, logits[k], hit, col, 1)

        workers.run(first, len(tiles), threads)
        m_rows, lse_rows, z_target, z_sum_rows = stats.merge()
        rows = pos if contiguous else idx[pos]
        s_rows = (lse_rows - m_rows).to(dtype)
        m[rows], s[rows] = m_rows, s_rows
        ce[rows] = (lse_rows - z_target).to(dtype)
        lse[rows] = lse_rows.to(dtype)
        if z_sum is not None:
            z_sum[rows] = z_sum_rows
        g_rows, a_rows = _coefficients(p, g, lse[rows])
        common = a_rows is None
        groups = _groups(len(tiles))
        grads.start_rows(h, h_input, g if common else g.new_ones(1), len(groups), pos.stop == idx.shape[0])
        neg_m = -m_rows

        def second(j: int, tiles=tiles, logits=logits, groups=groups, neg_m=neg_m, s_rows=s_rows, g_rows=g_rows,
                   a_rows=a_rows, common=common) -> None:  # fmt: skip
            for k in groups[j]:
                cols, hit, col = tiles[k]
                z_t, logits[k] = logits[k], None
                if p.softcap is None:  # the tile itself becomes the softmax
                    dz_t, z_t = z_t.add_(neg_m).sub_(s_rows).exp_(), None
                else:
                    dz_t = torch.add(z_t, neg_m).sub_(s_rows).exp_()
                grads.add(_dz_tile(p, dz_t, z_t, hit, col, g_rows, a_rows, common), cols, j, w[cols].to(dtype))

        workers.run(second, len(groups), threads)
        grads.end_rows(rows)
    return ce, m, s, lse, z_sum


def single_pass_rows(p: LossProblem, n_rows: int, threads: int) -> int:
    """Rows per block of `_single_pass_rows` over ``n_rows`` rows: ``threads + 1`` blocks' logits over
    the whole vocabulary fit `_single_pass_budget`; 0 where that is under ``MIN_SINGLE_PASS_ROWS``
    (and under ``n_rows``)."""
    buffers = threads + 1 if threads > 1 else 1
    size = p.compute_dtype.itemsize
    rows = _even(n_rows, _single_pass_budget(p, n_rows) // (size * max(1, p.weight.shape[0]) * buffers))
    return rows if rows >= min(n_rows, MIN_SINGLE_PASS_ROWS) else 0


def _single_pass_rows(
    p: LossProblem, g: Tensor, needs: tuple[bool, ...], rows: int, threads: int
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor | None, ...]]:
    """`_single_pass` by whole blocks of rows (no softcap; products through ``addmm_``): a worker
    forms a block's ``[rows, V]`` logits, their softmax and ``d z`` in place, and ``d hidden = d z @ W``
    of its rows; then ``d W`` and ``d b`` add each block's ``d z^T h`` in block order, in vocabulary
    stripes that different workers may take (`workers.run_blocks`). ``(ce, m, s, lse, z_sum)``, grads.
    """
    dtype = p.compute_dtype
    n, n_vocab = p.targets.shape[0], p.weight.shape[0]
    device = p.hidden.device
    ce = torch.zeros(n, dtype=dtype, device=device)
    m, s, lse = torch.zeros_like(ce), torch.zeros_like(ce), torch.zeros_like(ce)
    z_sum = torch.zeros_like(ce) if p.label_smoothing else None
    w, b = p.weight.to(dtype), _bias(p)  # the whole head in the compute dtype: every block reads all of it
    idx, contiguous = _valid_rows(p)
    blocks = [slice(start, min(start + rows, idx.shape[0])) for start in range(0, idx.shape[0], rows)]
    n_buffers = threads + 1 if threads > 1 else 1
    buffers = [torch.empty(min(rows, idx.shape[0]), n_vocab, dtype=dtype, device=device) for _ in range(n_buffers)]
    bounds = [k * n_vocab // (2 * threads) for k in range(2 * threads + 1)]
    stripes = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    dh = torch.zeros_like(p.hidden, dtype=dtype) if needs[0] else None
    dw = torch.empty(n_vocab, w.shape[1], dtype=dtype, device=device) if needs[1] else None
    db = torch.empty(n_vocab, dtype=dtype, device=device) if needs[2] else None
    rows_of: dict[int, Tensor] = {}
    common = not (p.label_smoothing or p.z_loss)  # else d z holds g (per-row coefficients)

    def compute(k: int, buffer: int) -> None:
        pos = blocks[k]
        at = pos if contiguous else idx[pos]
        h = p.hidden[at].to(dtype)
        t = p.targets[at]
        z = buffers[buffer][: h.shape[0]]
        if b is None:
            torch.mm(h, w.T, out=z)
        else:
            torch.addmm(b, h, w.T, out=z)
        arange = torch.arange(h.shape[0], device=device)
        z_target = z[arange, t]
        if z_sum is not None:
            z_sum[at] = z.sum(1)
        m_rows = z.amax(1)
        total = z.sub_(m_rows[:, None]).exp_().sum(1)
        lse_rows = m_rows.double() + total.double().log()
        z.div_(total[:, None])  # softmax
        m[at], s[at] = m_rows, total.log()
        ce[at] = (lse_rows - z_target).to(dtype)
        lse[at] = lse_rows.to(dtype)
        _dz_tile(p, z.T, None, arange, t, *_coefficients(p, g, lse[at]), common)  # z.T: [cols, rows]
        if dh is not None:
            if contiguous:
                torch.mm(z, w, out=dh[pos])
            else:
                dh[at] = z @ w
        rows_of[buffer] = h  # until every stripe has this block, when the buffer is free again

    def commit(k: int, stripe: int, buffer: int) -> None:
        cols = stripes[stripe]
        dz = buffers[buffer][: blocks[k].stop - blocks[k].start, cols]
        h = rows_of[buffer]
        if dw is not None:
            if k == 0:
                torch.mm(dz.T, h, out=dw[cols])
            else:
                dw[cols].addmm_(dz.T, h)
        if db is not None:
            if k == 0:
                torch.sum(dz, 0, out=db[cols])
            else:
                db[cols] += dz.sum(0)

    workers.run_blocks(compute, commit, len(blocks), len(stripes), n_buffers, threads)
    if not blocks:
        for x in (dw, db):
            if x is not None:
                x.zero_()
    scale = g if common else g.new_ones(1)
    grads = tuple(None if x is None else x.mul_(scale) for x in (dh, dw, db))
    return (ce, m, s, lse, z_sum), grads


def _bf16_where_fast(fn: Callable[..., Tensor | tuple]) -> Callable[..., Tensor | tuple]:
    """``fn(p, ...)`` with its products in bf16 where `products.bf16_products` runs them so for ``p``'s inputs."""

    @functools.wraps(fn)
    def wrapped(p: LossProblem, *args: object) -> Tensor | tuple:
        with products.bf16_products(p.hidden, p.weight):
            return fn(p, *args)

    return wrapped


def _top_k(p: LossProblem):
    """Top-k within each selection group of ``p`` (the flattened tokens), for `choose`."""

    def top_k(score: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kept, threshold, n_keep, n_valid = select_top(
            score.view(p.group_shape), valid.view(p.group_shape), p.keep_ratio
        )
        return kept.reshape(-1), threshold, n_keep, n_valid

    return top_k


def _outputs(p: LossProblem, ce: Tensor, m: Tensor, s: Tensor, lse: Tensor, z_sum: Tensor | None) -> tuple[Tensor, ...]:
    """Steps 4 to 6 after the per-token statistics: the operator's outputs (see `loss_forward`)."""
    valid = p.valid
    ref = reference_loss(p)
    excess = ce.clone() if ref is None else torch.where(valid, ce - ref, torch.zeros_like(ce))
    kept, threshold, n_kept, n_valid, weight, weight_sum = choose(p, excess, valid, _top_k(p))
    term = token_term(p, ce, lse, z_sum)
    per_token = torch.where(kept, term * weight if p.weighted else term, torch.zeros_like(ce))
    loss = reduce_loss(p, per_token, weight_sum)
    return loss, ce, excess, kept, threshold, n_kept, n_valid, weight, weight_sum, lse, torch.stack([m, s])


@_bf16_where_fast
def loss_forward(p: LossProblem) -> tuple[Tensor, ...]:
    """Steps 1 to 6: ``(loss, ce, excess, kept, threshold, n_kept, n_valid, weight, weight_sum, lse, aux)``,
    ``aux = [m; s]``."""
    return _outputs(p, *_forward(p))


def single_pass_applies(p: LossProblem) -> bool:
    """Whether the gradients may be formed in the forward (`_plain`), and that pays: a block of rows
    has ``MIN_SINGLE_PASS_ROWS``, and with 16-bit weights, the backward would not take one block."""
    fits = _one_pass_fits(p)
    # With a weight narrower than the compute dtype (bf16), the one pass holds the head and d W in
    # the compute dtype; two passes whose backward takes every valid row in one block hold neither.
    if fits and p.weight.dtype.itemsize < p.compute_dtype.itemsize:
        n_valid = int(p.valid.sum())
        threads = workers.threads_for(p.hidden.device)
        fits = _backward_plan(p, n_valid, threads, p.hidden.dtype == p.compute_dtype)[0] < n_valid
    return _plain(p) and fits


@_bf16_where_fast
def loss_single_pass(p: LossProblem, needs: tuple[bool, ...]) -> tuple[Tensor, ...]:
    """`loss_forward`'s outputs, then ``(d hidden, d weight, d bias)`` for an upstream gradient of 1
    (None where not needed); only where `single_pass_applies`. By whole blocks of rows
    (`_single_pass_rows`) where products go in place and there is no softcap, else by tiles
    (`_single_pass`)."""
    dtype = p.compute_dtype
    g = upstream(p, torch.ones((), dtype=dtype, device=p.hidden.device), p.valid.sum().reshape(1), dtype)
    threads = workers.threads_for(p.hidden.device)
    rows = single_pass_rows(p, p.targets.shape[0], threads)
    if rows and p.softcap is None and products.in_place(p.hidden.device, dtype):
        stats, (dh, dw, db) = _single_pass_rows(p, g, needs, rows, threads)
        dh = None if dh is None else dh.to(p.hidden.dtype)
        dw = None if dw is None else dw.to(p.weight.dtype)
        db = None if db is None else db.to(p.bias.dtype)
        return (*_outputs(p, *stats), dh, dw, db)
    grads = _Grads(p, p.weight, _bias(p), needs)
    outputs = _outputs(p, *_single_pass(p, g, grads))
    return (*outputs, *grads.result())


@_bf16_where_fast
def loss_backward(
    p: LossProblem, lse: Tensor, aux: Tensor, rows: Tensor, g: Tensor, g_lse: Tensor | None, needs: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Step 7 over the rows of ``rows``, from the forward's ``lse`` and ``aux = [m; s]``."""
    idx = rows.nonzero().squeeze(1)
    if g.numel() > 1:
        g = g[idx]
    g, a = _coefficients(p, g, lse[idx])  # per-row coefficients of the softmax
    if g_lse is not None:
        g = g.expand(idx.shape[0])
        a = (g if a is None else a) + g_lse[idx]
    grads = _Grads(p, p.weight, _bias(p), needs)
    _backward(p, aux[0], aux[1], idx, g, grads, a)
    return grads.result()


@_bf16_where_fast
def _token_ce(p: LossProblem) -> Tensor:
    """Per-token cross-entropy in fp32."""
    return _forward(p)[0].float()


_OPS = define(
    "chunked",
    loss_forward,
    loss_backward,
    _token_ce,
    lambda hidden: hidden.new_empty(2, hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32)),
    single_pass=(single_pass_applies, loss_single_pass),
)


def selective_loss(p: LossProblem) -> tuple[Tensor, Tensor, SelectionStats]:
    """The contract's loss; autograd runs the kept-rows-only backward, or for plain cross-entropy with
    gradients needed, the forward forms them (`loss_single_pass`)."""
    return _OPS.selective_loss(p)


def token_losses(p: LossProblem) -> Tensor:
    """Per-token cross-entropy, fp32, 0 at ignored tokens; one tile of logits at a time."""
    return _OPS.token_losses(p)
