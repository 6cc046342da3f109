"""Corpora in and batches out: reading a corpus, tokenizing and packing it, padding rows into a batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data_checks import corpus_ids, token_ids
from .errors import DataError
from .problem import IGNORE_INDEX


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the innermost exception that ``exc`` was raised from (first line only)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def pack_texts(texts: Iterable[str], tokenizer: Any, seq_len: int) -> list[np.ndarray]:
    """Tokenize documents, end each with the EOS token, concatenate, cut into rows of ``seq_len`` tokens.

    The incomplete last row is dropped (pre-training style packing: no padding, every token scored).
    """
    eos = tokenizer.eos_token_id
    texts = list(texts)
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    pieces = []
    for ids in encoded:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        pieces.append(np.asarray(ids, dtype=np.int32))
    flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    n = len(flat) // seq_len
    return list(flat[: n * seq_len].reshape(n, seq_len))


def split_rows(rows: Iterable[Sequence[int]], seq_len: int, label: str = "corpus row {}") -> list[np.ndarray]:
    """Pre-tokenized rows cut into pieces of at most ``seq_len`` tokens (pieces under 2 tokens dropped);
    ``label.format(i)`` names row ``i`` in an error."""
    out = []
    for i, row in enumerate(rows):
        arr = corpus_ids(row, label.format(i))  # the vocabulary's bound is checked where it is known
        for start in range(0, len(arr), seq_len):
            piece = arr[start : start + seq_len]
            if len(piece) >= 2:
                out.append(piece)
    return out


def pad_batch(
    rows: Sequence[dict[str, Any]], *, pad_id: int = 0, ignore_index: int = IGNORE_INDEX, with_ref_loss: bool = True
) -> dict[str, Tensor]:
    """Right-pad rows holding ``input_ids`` (and ``ref_loss``) into a batch.

    Returns ``input_ids`` and ``attention_mask`` [B, T], ``labels`` (``input_ids`` with
    ``ignore_index`` at padding) and, when the rows have it, ``ref_loss`` (0 at padding).
    A row whose ids are not whole numbers, or whose ``ref_loss`` is missing or of another length
    than its ``input_ids``, raises `rho_fused.errors.DataError` naming the row.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    has_ref = with_ref_loss and "ref_loss" in rows[0] and rows[0]["ref_loss"] is not None
    ref = torch.zeros((len(rows), width), dtype=torch.float32) if has_ref else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        # copies (token_ids' astype, np.array): rows may be read-only memory maps
        ids[i, :n] = torch.from_numpy(token_ids(r["input_ids"], f"row {i} of the batch"))
        mask[i, :n] = 1
        if ref is not None:
            if r.get("ref_loss") is None or len(r["ref_loss"]) != n:
                got = "no ref_loss" if r.get("ref_loss") is None else f"{len(r['ref_loss'])} ref_loss values"
                raise DataError(f"row {i} of the batch has {got} for its {n} input_ids (one per token is needed)")
            ref[i, :n] = torch.from_numpy(np.array(r["ref_loss"], dtype=np.float32))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, ignore_index)}
    if ref is not None:
        batch["ref_loss"] = ref
    return batch
