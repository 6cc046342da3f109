"""Corpora in and batches out: reading a corpus, tokenizing and packing it, padding rows into a batch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data_checks import corpus_ids, token_ids
from .errors import DataError
from .problem import IGNORE_INDEX

CORPUS_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def load_saved_corpus(p: Path) -> Any:
    """A ``save_to_disk`` directory as a `datasets.Dataset`, memory-mapped (a ``DatasetDict`` gives its
    ``train`` split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # not a dataset directory, or a damaged one
        raise DataError(f"corpus {p} is not a readable save_to_disk directory ({root_cause(e)})") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"corpus {p} is a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    return ds


def corpus_file_kind(p: Path) -> str:
    """The `datasets` reader of corpus file ``p`` (``json``, ``parquet``, ``csv``, ``text``); refuses a
    missing, empty or unknown file."""
    if not p.exists():
        raise FileNotFoundError(f"corpus not found: {p}")
    kind = CORPUS_FILE_KINDS.get(p.suffix)
    if kind is None:
        raise ValueError(f"corpus {p}: expected a save_to_disk directory or a .jsonl/.json/.parquet/.csv/.txt file")
    if p.stat().st_size == 0:
        raise DataError(f"corpus {p} is empty")
    return kind


def load_corpus(path: str | os.PathLike) -> Any:
    """A corpus as a `datasets.Dataset`: a directory written by ``save_to_disk`` (a ``DatasetDict``
    gives its ``train`` split), or a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.txt`` file
    (a ``.txt`` file is one document). Read locally; nothing is downloaded.
    """
    import datasets

    p = Path(path)
    if p.is_dir():
        return load_saved_corpus(p)
    kind = corpus_file_kind(p)
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train", **kwargs)
    except Exception as e:  # datasets wraps the parser's error: name the file and the real cause
        raise DataError(f"corpus {p} cannot be read as a {p.suffix} file ({root_cause(e)})") from e


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
    for i, row in enumerate(rows):
        arr = corpus_ids(row, f"corpus row {i}")  # the vocabulary's bound is checked where it is known
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
