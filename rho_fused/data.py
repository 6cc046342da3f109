"""Corpora in and batches out: reading a corpus, tokenizing and packing it, padding rows into a batch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .problem import IGNORE_INDEX


def load_corpus(path: str | os.PathLike) -> Any:
    """A corpus as a `datasets.Dataset`: a directory written by ``save_to_disk`` (a ``DatasetDict``
    gives its ``train`` split), or a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.txt`` file
    (a ``.txt`` file is one document). Read locally; nothing is downloaded.
    """
    import datasets

    p = Path(path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"corpus {p} is a DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        return ds
    if not p.exists():
        raise FileNotFoundError(f"corpus not found: {p}")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}.get(p.suffix)
    if kind is None:
        raise ValueError(f"corpus {p}: expected a save_to_disk directory or a .jsonl/.json/.parquet/.csv/.txt file")
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    return datasets.load_dataset(kind, data_files=str(p), split="train", **kwargs)


def pack_texts(texts: Iterable[str], tokenizer: Any, seq_len: int) -> list[np.ndarray]:
    """Tokenize documents, end each with the EOS token, concatenate, cut into rows of ``seq_len`` tokens.

    The incomplete last row is dropped (pre-training style packing: no padding, every token scored).
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        stream.extend(ids)
    n = len(stream) // seq_len
    arr = np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return list(arr)


def split_rows(rows: Iterable[Sequence[int]], seq_len: int) -> list[np.ndarray]:
    """Pre-tokenized rows cut into pieces of at most ``seq_len`` tokens (pieces under 2 tokens dropped)."""
    out = []
    for row in rows:
        arr = np.asarray(row, dtype=np.int32)
        for start in range(0, len(arr), seq_len):
            piece = arr[start : start + seq_len]
            if len(piece) >= 2:
                out.append(piece)
    return out


def corpus_rows(corpus: Any, tokenizer: Any, seq_len: int, text_column: str = "text") -> list[np.ndarray]:
    """Token rows of a corpus: its ``input_ids`` column split to ``seq_len``, or its text column packed."""
    columns = corpus.column_names
    if "input_ids" in columns:
        return split_rows(corpus["input_ids"], seq_len)
    if text_column in columns:
        return pack_texts(corpus[text_column], tokenizer, seq_len)
    raise ValueError(f"corpus must have an 'input_ids' or a {text_column!r} column, got columns {columns}")


def pad_batch(
    rows: Sequence[dict[str, Any]], *, pad_id: int = 0, ignore_index: int = IGNORE_INDEX, with_ref_loss: bool = True
) -> dict[str, Tensor]:
    """Right-pad rows holding ``input_ids`` (and ``ref_loss``) into a batch.

    Returns ``input_ids`` and ``attention_mask`` [B, T], ``labels`` (``input_ids`` with
    ``ignore_index`` at padding) and, when the rows have it, ``ref_loss`` (0 at padding).
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    has_ref = with_ref_loss and "ref_loss" in rows[0] and rows[0]["ref_loss"] is not None
    ref = torch.zeros((len(rows), width), dtype=torch.float32) if has_ref else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.from_numpy(np.array(r["input_ids"], dtype=np.int64))  # a copy: rows may be read-only maps
        mask[i, :n] = 1
        if ref is not None:
            ref[i, :n] = torch.from_numpy(np.array(r["ref_loss"], dtype=np.float32))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, ignore_index)}
    if ref is not None:
        batch["ref_loss"] = ref
    return batch
