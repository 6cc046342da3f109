"""A scored corpus on disk: Arrow shards written as they fill, a manifest written last, read memory-mapped.

Layout of a scored directory (format version 2)::

    shard-BBBBBBBB-PPPP.arrow   rows of block B (see `rho_fused.stream`), part P: Arrow IPC stream files
                                with the columns ``input_ids`` (list<int32>) and ``ref_loss`` (list<float32>)
    progress/block-BBBBBBBB.json  written when block B is complete: its parts and counts
    run.json                    what decides the output (corpus, models, sizes): a resumed run must match
    rho_fused.json              the manifest: fingerprints, every shard in row order with its counts, totals

Global row order is the order of the shard names (block, then part, then row), whatever rank wrote
them: one process and several write the same files. A part holds at most ``shard_tokens`` tokens and
ends at a scoring batch's edge, so a run resumed after the last complete part forms the same batches,
and so the same numbers, as one that never stopped. Parts are written under a temporary name and
renamed when complete; the manifest exists only once every block is complete.

While a run is in progress the directory is ``OUT.partial`` (``--resume`` continues it); when the
manifest is written it is renamed to ``OUT`` (replacing an older output only then).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_dir, write_json
from .errors import DataError

MANIFEST = "rho_fused.json"
RUN_FILE = "run.json"
PROGRESS = "progress"
PARTIAL_SUFFIX = ".partial"


def shard_name(block: int, part: int) -> str:
    return f"shard-{block:08d}-{part:04d}.arrow"


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("ref_loss", pa.list_(pa.float32()))])


def _record_batch(ids: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> Any:
    import pyarrow as pa

    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in ids], out=offsets[1:])
    flat_ids = np.concatenate(ids).astype(np.int32, copy=False) if ids else np.zeros(0, np.int32)
    flat_ref = np.concatenate(ref).astype(np.float32, copy=False) if ref else np.zeros(0, np.float32)
    return pa.record_batch(
        [pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ids)),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ref))],
        schema=_schema(),
    )  # fmt: skip


class ShardWriter:
    """One part file: record batches appended as they are scored, renamed into place by `close`."""

    def __init__(self, directory: Path, block: int, part: int) -> None:
        import pyarrow as pa

        self.final = directory / shard_name(block, part)
        self.tmp = directory / f".{self.final.name}.tmp-{os.getpid()}"
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, _schema())
        self.rows = self.tokens = 0

    def append(self, ids: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> None:
        self._writer.write_batch(_record_batch(ids, ref))
        self.rows += len(ids)
        self.tokens += sum(len(r) for r in ids)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        with open(self.tmp, "rb") as f:  # on disk before it is named complete
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
            self._sink.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def _open_shard(path: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Memory-map one shard: per record batch, (row offsets, flat input_ids, flat ref_loss), no copy."""
    import pyarrow as pa

    out = []
    with pa.ipc.open_stream(pa.memory_map(str(path), "r")) as reader:
        for rb in reader:
            ids, ref = rb.column(0), rb.column(1)
            offsets = ids.offsets.to_numpy()
            out.append((offsets, ids.values.to_numpy(), ref.values.to_numpy()))
    return out


def shard_stats(path: Path) -> dict[str, Any]:
    """Rows, tokens and the float64 sum of ``ref_loss`` of one shard file."""
    rows = tokens = 0
    ref_sum = 0.0
    for offsets, ids, ref in _open_shard(path):
        rows += len(offsets) - 1
        tokens += len(ids)
        ref_sum += float(ref.sum(dtype=np.float64))
    return {"file": path.name, "rows": rows, "tokens": tokens, "ref_loss_sum": ref_sum}


class ScoredShards:
    """The rows of a scored directory, in global order, read from memory-mapped shards.

    ``shards[i]`` is ``{"input_ids": int32 array, "ref_loss": float32 array}``, views into the
    mapped files (read-only, nothing copied). At most ``max_open`` shards are mapped at once (least
    recently used closed first), so a corpus of many shards does not run out of file descriptors.
    """

    column_names = ("input_ids", "ref_loss")

    def __init__(self, directory: str | os.PathLike, shards: Sequence[dict[str, Any]], max_open: int = 64) -> None:
        self.directory = Path(directory)
        self.files = [self.directory / s["file"] for s in shards]
        self._starts = [0]
        for s in shards:
            self._starts.append(self._starts[-1] + int(s["rows"]))
        self._open: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._max_open = max_open

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict[str, Any]:  # for DataLoader workers: each maps the files again
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def _shard(self, k: int) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        batches = _open_shard(self.files[k])
        starts = [0]
        for offsets, _, _ in batches:
            starts.append(starts[-1] + len(offsets) - 1)
        self._open[k] = (starts, batches)
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return self._open[k]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a scored corpus of {n} rows")
        i %= n
        k = bisect.bisect_right(self._starts, i) - 1
        starts, batches = self._shard(k)
        j = i - self._starts[k]
        b = bisect.bisect_right(starts, j) - 1
        offsets, ids, ref = batches[b]
        r = j - starts[b]
        lo, hi = offsets[r], offsets[r + 1]
        return {"input_ids": ids[lo:hi], "ref_loss": ref[lo:hi]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def as_dataset(self) -> Any:
        """The same rows as a `datasets.Dataset`, memory-mapped from the shard files (for `transformers.Trainer`)."""
        import datasets

        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in self.files])


class ShardStore:
    """The in-progress directory of one scoring run, shared by every rank (on a shared file system).

    `open` creates it or, with ``resume``, checks that it was started with the same ``run`` settings.
    A rank writes the blocks it owns (`done_blocks`, `resume_point`, `part_writer`, `finish_block`);
    rank 0 then writes the manifest (`write_manifest`) and moves the directory to its final name
    (`publish`).
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out = Path(out_dir)
        self.dir = self.out.with_name(self.out.name + PARTIAL_SUFFIX)

    def open(self, run: dict[str, Any], *, resume: bool, create: bool) -> None:
        """Create the directory (``create``: rank 0) or check it against ``run`` (a resumed one)."""
        run_file = self.dir / RUN_FILE
        if create:
            if self.dir.exists() and not resume:
                raise FileExistsError(
                    f"{self.dir} holds the shards of an interrupted run; pass --resume to continue it, "
                    f"or delete it to start again"
                )
            if self.dir.exists() and run_file.is_file():
                saved = json.loads(run_file.read_text(encoding="utf-8"))
                if saved != run:
                    diff = {
                        k: (saved.get(k), run.get(k))
                        for k in sorted(set(saved) | set(run))
                        if saved.get(k) != run.get(k)
                    }
                    raise ValueError(f"cannot resume {self.dir}: the run's settings differ (saved, given): {diff}")
            (self.dir / PROGRESS).mkdir(parents=True, exist_ok=True)
            write_json(run_file, run)

    def done_blocks(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in (self.dir / PROGRESS).glob("block-*.json")}

    def resume_point(self, block: int) -> tuple[int, int]:
        """``(next part, rows already written)`` of a block: its complete parts are kept, anything else removed."""
        for p in self.dir.glob(f".shard-{block:08d}-*.tmp-*"):
            p.unlink(missing_ok=True)  # a part a killed run was writing
        parts, rows = 0, 0
        while (self.dir / shard_name(block, parts)).is_file():
            rows += shard_stats(self.dir / shard_name(block, parts))["rows"]
            parts += 1
        for p in self.dir.glob(f"shard-{block:08d}-*.arrow"):
            if int(p.stem.split("-")[2]) >= parts:
                p.unlink()  # cannot happen with parts written in order; never kept
        return parts, rows

    def part_writer(self, block: int, part: int) -> ShardWriter:
        return ShardWriter(self.dir, block, part)

    def finish_block(self, block: int) -> None:
        """Record block ``block`` complete, with the counts of its parts (read back from the files)."""
        parts = []
        while (self.dir / shard_name(block, len(parts))).is_file():
            parts.append(shard_stats(self.dir / shard_name(block, len(parts))))
        write_json(self.dir / PROGRESS / f"block-{block:08d}.json", {"block": block, "parts": parts})

    def write_manifest(self, header: dict[str, Any], n_blocks: int) -> dict[str, Any]:
        """The manifest over blocks ``0 .. n_blocks - 1`` (all must be complete), written last. Returns it."""
        shards: list[dict[str, Any]] = []
        ref_sum = 0.0
        for b in range(n_blocks):
            path = self.dir / PROGRESS / f"block-{b:08d}.json"
            if not path.is_file():
                raise RuntimeError(f"block {b} of {n_blocks} was not completed by its rank ({path} is missing)")
            for part in json.loads(path.read_text(encoding="utf-8"))["parts"]:
                ref_sum += part.pop("ref_loss_sum")
                shards.append(part)
        rows = sum(s["rows"] for s in shards)
        if rows == 0:
            self.discard()  # nothing to resume
            raise DataError("the corpus gave no token rows to score (is it shorter than one sequence?)")
        tokens = sum(s["tokens"] for s in shards)
        meta = {
            **header,
            "n_sequences": rows,
            "n_tokens": tokens,
            "mean_ref_loss": ref_sum / max(tokens - rows, 1),  # position 0 of each row is not scored
            "n_blocks": n_blocks,
            "shards": shards,
        }
        write_json(self.dir / MANIFEST, meta)
        return meta

    def publish(self, overwrite: bool) -> None:
        """Move the complete directory to its final name (an older output is replaced only now)."""
        with atomic_dir(self.out, overwrite=overwrite) as tmp:
            os.rmdir(tmp)
            os.replace(self.dir, tmp)  # atomic_dir then renames it to OUT

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
