"""The kernels' launch plan: how the forward splits the vocabulary, how the backward chunks it.

Pure arithmetic on plain numbers (shapes, dtype, SM count, kept-row capacity, tile configurations):
no tensor, no launch. The launchers (`.forward.logsumexp_partials`, `.backward.kept_rows_backward`)
call `forward_plan` and `backward_plan` with the device's figures; the offline compile report
(`rho_fused.kernels.report`) and the roofline model (``bench/roofline.py``) call `launch_plan`
with the modelled GPU's, so the three read one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# Programs wanted per streaming multiprocessor before the vocabulary is split further. The 16-bit
# forward kernel takes 255 registers x 256 threads, so one program fits on an SM at a time: programs
# run in waves of one per SM, and eight waves keep the last, partly filled one to an eighth of the time.
PROGRAMS_PER_SM = 8

# The SM count of the GPU the report and the roofline model plan for: H100 SXM (the H200 has as many).
H100_SMS = 132


class ForwardConfigLike(Protocol):
    """What the plan reads of a `rho_fused.kernels.forward.ForwardConfig` (no import: the launchers
    import this module)."""

    block_n: int
    block_v: int
    splits: int | None


class BackwardConfigLike(Protocol):
    """What the plan reads of a `rho_fused.kernels.backward.BackwardConfig`."""

    block_n: int
    block_v: int
    budget_bytes: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ForwardPlan:
    """Grid of the forward kernel: ``row_tiles * splits`` programs, the slice index varying fastest."""

    row_tiles: int  # ceil(N / block_n)
    splits: int  # vocabulary slices per row tile, none empty
    v_per_split: int  # columns per slice, a multiple of block_v

    @property
    def programs(self) -> int:
        return self.row_tiles * self.splits


@dataclass(frozen=True)
class BackwardPlan:
    """The backward's vocabulary chunks: ``chunks`` launches of the dz kernel over ``[capacity, Vc]``."""

    capacity: int  # C: rows of the dz buffer and of the cuBLAS matmuls
    row_tiles: int  # ceil(C / block_n)
    chunk_columns: int  # Vc, a multiple of block_v
    chunks: int  # ceil(V / Vc)


@dataclass(frozen=True)
class LaunchPlan:
    forward: ForwardPlan
    backward: BackwardPlan


def forward_plan(n: int, v: int, sms: int | None, cfg: ForwardConfigLike) -> ForwardPlan:
    """Vocabulary slices per row tile: ``cfg.splits`` if set, else ``ceil(PROGRAMS_PER_SM * sms /
    row_tiles)`` (1 without an SM count: no GPU to fill), at most one per vocabulary tile; then the
    slice width rounded up to a tile, and the count again so that no slice is empty."""
    row_tiles = _cdiv(n, cfg.block_n)
    vocab_tiles = _cdiv(v, cfg.block_v)
    if cfg.splits is not None:
        splits = max(1, min(cfg.splits, vocab_tiles))
    elif sms is None:
        splits = 1
    else:
        splits = max(1, min(_cdiv(PROGRAMS_PER_SM * sms, max(1, row_tiles)), vocab_tiles))
    v_per_split = _cdiv(_cdiv(v, splits), cfg.block_v) * cfg.block_v
    return ForwardPlan(row_tiles, _cdiv(v, v_per_split), v_per_split)


def backward_plan(capacity: int, v: int, d: int, dtype: torch.dtype, cfg: BackwardConfigLike) -> BackwardPlan:
    """``Vc``: the vocabulary columns per chunk within ``cfg.budget_bytes`` for the ``[C, Vc]`` dz
    buffer in ``dtype`` (plus, for fp16, the ``[Vc, D]`` fp32 product ``dz.T @ H`` before its scaling
    by ``s``), a multiple of ``block_v``, at least one tile, at most the vocabulary rounded up to one."""
    per_col = max(1, capacity) * torch.finfo(dtype).bits // 8
    if dtype == torch.float16:
        per_col += d * 4
    cols = max(1, cfg.budget_bytes // per_col // cfg.block_v) * cfg.block_v
    cols = min(cols, _cdiv(v, cfg.block_v) * cfg.block_v)
    return BackwardPlan(capacity, _cdiv(capacity, cfg.block_n), cols, _cdiv(v, cols))


def launch_plan(
    n: int,
    d: int,
    v: int,
    dtype: torch.dtype,
    *,
    sms: int | None,
    capacity: int,
    forward_config: ForwardConfigLike,
    backward_config: BackwardConfigLike,
) -> LaunchPlan:
    """Both launches of one loss call: the forward over ``N`` rows on ``sms`` SMs, the backward over
    ``capacity`` kept rows (the launcher's ``capacity``; ``ceil(keep_ratio * N)`` when every row is
    valid and one group selects)."""
    return LaunchPlan(
        forward_plan(n, v, sms, forward_config),
        backward_plan(capacity, v, d, dtype, backward_config),
    )
