"""Checks of token rows before the first step, and a fingerprint that tells one dataset from another.

A row is a mapping with ``input_ids`` (and, for SLM, ``ref_loss``) or a bare array of token ids.
`check_row` refuses, naming the row and the position: ids that are not integers, ids outside
``[0, vocab)``, a ``ref_loss`` of another length than ``input_ids``, a non-finite ``ref_loss`` at a
scored position (1 to n-1: position 0 predicts nothing). `check_rows` runs it over a whole dataset
in chunks, with a progress bar, and refuses a dataset in which no token is predictable (every row
shorter than 2 tokens). `data_fingerprint` hashes the row count and up to 256 evenly spaced rows:
cheap on any size, and different for different data with overwhelming probability (a change
confined to rows it does not sample goes unseen).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .errors import DataError

CHUNK_ROWS = 4096  # rows read at a time from a dataset on disk
FINGERPRINT_ROWS = 256


def row_parts(row: Any) -> tuple[Any, Any]:
    """``(input_ids, ref_loss or None)`` of a row given as a mapping or as a bare id array."""
    if isinstance(row, Mapping):
        return row["input_ids"], row.get("ref_loss")
    return row, None


def token_ids(values: Any, where: str) -> np.ndarray:
    """``values`` as an int64 id array; non-integer values refused (``where`` names the row in messages)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{where}: input_ids must be a list of token ids, got an array of shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if bad.size:
            raise DataError(f"{where}: input_ids[{bad[0]}] = {arr[bad[0]].item()!r} is not an integer token id")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{where}: input_ids must be integer token ids, got values of type {arr.dtype}")
    return arr.astype(np.int64)


def corpus_ids(values: Any, where: str) -> np.ndarray:
    """A corpus row's ids as int32: whole numbers (`token_ids`) from 0 to int32's largest, else `DataError`."""
    arr = token_ids(values, where)
    top = np.iinfo(np.int32).max
    bad = np.flatnonzero((arr < 0) | (arr > top))
    if bad.size:
        p = int(bad[0])
        raise DataError(f"{where}: token id {arr[p]} at position {p} is not a valid token id")
    return arr.astype(np.int32)


def check_row(row: Any, where: str, *, vocab: int | None, need_ref_loss: bool = False) -> int:
    """Refuse a bad row (see the module docstring); return its number of predictable tokens."""
    ids_in, ref = row_parts(row)
    ids = token_ids(ids_in, where)
    if vocab is not None and ids.size:
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            p = int(bad[0])
            raise DataError(f"{where}: token id {ids[p]} at position {p} is outside the vocabulary [0, {vocab})")
    if need_ref_loss:
        if ref is None:
            raise DataError(f"{where}: no ref_loss (SLM needs the per-token losses of `rho-fused score`)")
        ref = np.asarray(ref)
        if ref.shape != ids.shape:
            raise DataError(f"{where}: ref_loss has {ref.size} values but input_ids has {ids.size} tokens")
        bad = np.flatnonzero(~np.isfinite(ref[1:]))
        if bad.size:
            p = int(bad[0]) + 1
            raise DataError(f"{where}: ref_loss[{p}] = {ref[p]} at a scored position (a finite loss is needed)")
    return max(ids.size - 1, 0)


def row_chunks(data: Any, chunk: int = CHUNK_ROWS) -> Iterator[tuple[int, list[Any]]]:
    """``(first index, rows)`` over ``data``, ``chunk`` rows at a time (a `datasets.Dataset` is read by slices)."""
    n = len(data)
    columnar = type(data).__module__.split(".")[0] == "datasets"  # a `datasets.Dataset`: read by slices
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        if columnar:
            cols = data[start:stop]  # one read per chunk: {column: rows}
            names = [c for c in ("input_ids", "ref_loss") if c in cols]
            yield start, [{c: cols[c][j] for c in names} for j in range(stop - start)]
        else:
            yield start, [data[i] for i in range(start, stop)]


def check_rows(
    data: Sequence[Any] | Any,
    name: str,
    *,
    vocab: int | None,
    need_ref_loss: bool = False,
    progress: bool = True,
    chunk: int = CHUNK_ROWS,
) -> int:
    """Check every row of ``data`` (named ``name`` in messages); return the predictable tokens.

    Raises `DataError` at the first bad row, or when no token at all is predictable.
    """
    total = 0
    with tqdm(total=len(data), desc=f"check {name}", unit="row", disable=not progress, leave=False) as bar:
        for start, rows in row_chunks(data, chunk):
            for j, row in enumerate(rows):
                total += check_row(row, f"{name}, row {start + j}", vocab=vocab, need_ref_loss=need_ref_loss)
            bar.update(len(rows))
    if total == 0:
        raise DataError(f"{name} has no predictable token: its {len(data)} rows are all shorter than 2 tokens")
    return total


def data_fingerprint(data: Sequence[Any] | Any, samples: int = FINGERPRINT_ROWS) -> str:
    """sha256 (16 hex digits) of the row count and of up to ``samples`` evenly spaced rows (ids and ref_loss)."""
    n = len(data)
    h = hashlib.sha256(f"rows={n}".encode())
    for i in sorted({int(k) for k in np.linspace(0, n - 1, num=min(samples, n))} if n else ()):
        ids, ref = row_parts(data[i])
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        if ref is not None:
            h.update(np.asarray(ref, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]
