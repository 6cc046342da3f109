"""A corpus as a stream of blocks: read without loading it, tokenized (in worker processes if asked), packed.

The unit of work is a *block*: ``docs_per_block`` consecutive documents of the corpus (the last block
may hold fewer). A block's documents are tokenized, each ended with EOS, concatenated and cut into
rows of ``seq_len`` tokens, the incomplete last row dropped: packing never crosses a block boundary
(as Hugging Face's ``run_clm`` packs each ``map`` batch), so a block's rows depend on that block
alone. That is what lets ranks score disjoint blocks without reading each other's tokens, and lets
a resumed run rebuild one block without the ones before it. A pre-tokenized corpus (an
``input_ids`` column, or rows given in memory) is cut into pieces of at most ``seq_len`` tokens
instead (pieces under 2 tokens dropped), again block by block.

Files (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ``.txt``) are read with ``datasets``
streaming; a ``save_to_disk`` directory is memory-mapped and read a block at a time.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import pack_texts, root_cause, split_rows
from .errors import DataError


@dataclass
class Block:
    """``docs_per_block`` consecutive documents: texts (``kind == "text"``) or token rows (``"input_ids"``)."""

    index: int
    kind: str
    docs: list[Any]


def block_rows(block: Block, tokenizer: Any, seq_len: int) -> list[np.ndarray]:
    """The token rows of one block (see the module docstring)."""
    if block.kind == "text":
        return pack_texts(block.docs, tokenizer, seq_len)
    return split_rows(block.docs, seq_len, label="corpus document {} of its block")


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


class CorpusSource:
    """The documents of a corpus, a block at a time, never all in memory.

    ``path`` is a ``save_to_disk`` directory (a ``DatasetDict`` gives its ``train`` split) or a
    ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.txt`` file (a ``.txt`` file is one document).
    The corpus has an ``input_ids`` column (pre-tokenized) or a ``text_column``.
    """

    def __init__(self, path: str | os.PathLike, text_column: str = "text") -> None:
        import datasets

        self.path = Path(path)
        p = self.path
        if p.is_dir():
            ds = load_saved_corpus(p)
            columns = ds.column_names
        else:
            kind = corpus_file_kind(p)
            kwargs = {"sample_by": "document"} if kind == "text" else {}
            try:
                ds = datasets.load_dataset(kind, data_files=str(p), split="train", streaming=True, **kwargs)
                columns = ds.column_names
                if columns is None:  # the reader learns them from the first record
                    columns = list(next(iter(ds)).keys())
            except StopIteration:
                raise DataError(f"corpus {p} holds no record") from None
            except Exception as e:  # datasets wraps the parser's error: name the file and the real cause
                raise DataError(f"corpus {p} cannot be read as a {p.suffix} file ({root_cause(e)})") from e
        if "input_ids" in columns:
            self.kind, self.column = "input_ids", "input_ids"
        elif text_column in columns:
            self.kind, self.column = "text", text_column
        else:
            raise ValueError(f"corpus {p} must have an 'input_ids' or a {text_column!r} column, got columns {columns}")
        self._ds = ds.select_columns([self.column])

    def fingerprint(self) -> str:
        """What identifies the corpus read: its path, and the size and modification time of its files."""
        files = sorted(f for f in self.path.rglob("*") if f.is_file()) if self.path.is_dir() else [self.path]
        h = hashlib.sha256(str(self.path.resolve()).encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def blocks(self, docs_per_block: int, wanted: Any = None) -> Iterator[Block | int]:
        """Every block in order: a `Block` where ``wanted(index)`` is true (default: all), else its index alone.

        A memory-mapped directory reads only the wanted blocks; a streamed file parses the others
        too (it cannot seek), but keeps none of them.
        """
        import datasets

        if isinstance(self._ds, datasets.Dataset):
            for index, lo in enumerate(range(0, len(self._ds), docs_per_block)):
                if wanted is None or wanted(index):
                    yield Block(index, self.kind, self._ds[lo : lo + docs_per_block][self.column])
                else:
                    yield index
            return
        try:
            for index, batch in enumerate(self._ds.iter(batch_size=docs_per_block)):
                yield Block(index, self.kind, batch[self.column]) if wanted is None or wanted(index) else index
        except Exception as e:  # a record the parser cannot read, met while streaming
            raise DataError(f"corpus {self.path} cannot be read as a {self.path.suffix} file ({root_cause(e)})") from e


class RowsSource:
    """Token rows already in memory (`score_corpus` called with rows), as blocks of ``docs_per_block`` rows."""

    kind = "input_ids"

    def __init__(self, rows: Sequence[Sequence[int]]) -> None:
        self.rows = rows

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.rows:
            a = np.ascontiguousarray(np.asarray(r, dtype=np.int64))
            h.update(len(a).to_bytes(8, "little") + a.tobytes())
        return h.hexdigest()[:16]

    def blocks(self, docs_per_block: int, wanted: Any = None) -> Iterator[Block | int]:
        for index, lo in enumerate(range(0, len(self.rows), docs_per_block)):
            if wanted is None or wanted(index):
                yield Block(index, self.kind, list(self.rows[lo : lo + docs_per_block]))
            else:
                yield index


_worker_tokenizer: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process, one core


def _worker_rows(block: Block, seq_len: int) -> tuple[int, list[np.ndarray]]:
    return block.index, block_rows(block, _worker_tokenizer, seq_len)


def rows_of_blocks(
    blocks: Iterator[Block | int], tokenizer: Any, seq_len: int, num_proc: int = 1
) -> Iterator[tuple[int, list[np.ndarray]] | int]:
    """``(index, rows)`` for each `Block` of ``blocks`` in order (an index alone passes through).

    With ``num_proc > 1`` the blocks are tokenized in that many worker processes (spawned), at most
    ``2 * num_proc`` blocks ahead of the consumer, so memory stays bounded while the model scores.
    """
    if num_proc <= 1:
        for b in blocks:
            yield b if isinstance(b, int) else (b.index, block_rows(b, tokenizer, seq_len))
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        for b in blocks:
            pending.append(b if isinstance(b, int) else pool.apply_async(_worker_rows, (b, seq_len)))
            while len(pending) > 2 * num_proc or (pending and isinstance(pending[0], int)):
                head = pending.popleft()
                yield head if isinstance(head, int) else head.get()
        while pending:
            head = pending.popleft()
            yield head if isinstance(head, int) else head.get()
