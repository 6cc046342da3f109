"""Scoring a corpus with a reference model: the per-token ``ref_loss`` that SLM training reads.

`score_corpus` streams a corpus (`rho_fused.stream`), scores it a batch at a time and writes Arrow
shards with two columns, ``input_ids`` and ``ref_loss`` (aligned: ``ref_loss[t]`` is the reference
model's loss for predicting ``input_ids[t]`` from the tokens before it; ``ref_loss[0] = 0``), then
the manifest ``rho_fused.json`` holding the fingerprints of the tokenizer and the reference model,
the sequence length and the shard list (`rho_fused.shards`). `load_scored` reads it back,
memory-mapped, and refuses it when its tokenizer fingerprint is not the one of the tokenizer in hand.

Under torch.distributed (``torchrun``) the corpus's blocks are dealt to the ranks in turn and each
rank writes the shards of its own blocks: the output is the one a single process writes, file for
file, batch for batch the same computation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import recover
from .data import pad_batch, root_cause
from .data_checks import check_row
from .errors import DataError, UsageError
from .hf import head_inputs, next_token_targets, shift_right
from .loss import token_losses
from .outputs import check_replaceable, write_marker
from .ranks import from_rank_zero, min_over_ranks, rank_and_world, sum_over_ranks

META_FILE = "rho_fused.json"
FORMAT = "rho-fused scored corpus"
FORMAT_VERSION = 2  # 1: one save_to_disk dataset; 2: Arrow shards and a manifest (rho_fused.shards)


class FingerprintMismatchError(UsageError):
    """A scored dataset was made with another tokenizer (or reference model) than the one given."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the vocabulary, merges, normalisation and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's class, config and every weight (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def name_of(obj: Any) -> str:
    """The path or hub name an object was loaded from, or its class name."""
    name = getattr(obj, "name_or_path", None) or getattr(getattr(obj, "config", None), "_name_or_path", None)
    return str(name) if name else type(obj).__name__


DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 128 MiB of input_ids and ref_loss per shard at most
DEFAULT_DOCS_PER_BLOCK = 1000  # documents packed together (Hugging Face's run_clm packs 1000 at a time)


@torch.no_grad()
def score_batch(model: nn.Module, rows: Sequence[np.ndarray], *, backend: str = "auto") -> list[np.ndarray]:
    """Per-token reference losses of token rows (fp32, aligned with the tokens, 0 at position 0).

    The model's body gives the final hidden states; `token_losses` turns them into per-token
    cross-entropy without materialising the logits. The rows are right-padded into one batch.
    """
    device = next(model.parameters()).device
    batch = pad_batch([{"input_ids": r} for r in rows])
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hidden, weight, bias, softcap = head_inputs(model, ids, mask)
    targets = next_token_targets(batch["labels"].to(device))
    ce = token_losses(hidden, weight, targets, bias=bias, softcap=softcap, backend=backend)
    ce = shift_right(ce, 0.0).float().cpu().numpy()
    return [ce[j, : len(r)].copy() for j, r in enumerate(rows)]


@torch.no_grad()
def score_rows(
    model: nn.Module,
    rows: Sequence[np.ndarray],
    *,
    batch_size: int = 8,
    backend: str = "auto",
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> list[np.ndarray | None]:
    """Per-token reference losses of token rows held in memory, batched by length to limit padding.

    The same numbers as `score_batch` on each batch. ``shard=(rank, world)`` scores only the batches
    ``rank, rank + world, ...`` of that order (the others are None in the result). `score_corpus`
    streams a corpus instead; this serves callers that hold their rows (`rho_fused.online_ref`'s
    comparisons).
    """
    rank, world = shard
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    starts = range(rank * batch_size, len(order), batch_size * world)
    out: list[np.ndarray | None] = [None] * len(rows)
    total = sum(len(rows[i]) for start in starts for i in order[start : start + batch_size])
    bar = tqdm(total=total, unit="tok", desc="score", disable=not progress)
    for start in starts:
        idx = order[start : start + batch_size]
        for i, ce in zip(idx, score_batch(model, [rows[i] for i in idx], backend=backend), strict=True):
            out[i] = ce
        bar.update(sum(len(rows[i]) for i in idx))
    bar.close()
    return out


def _check_sizes(seq_len: int, batch_size: int, shard_tokens: int, docs_per_block: int, num_proc: int) -> None:
    lows = (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("docs_per_block", docs_per_block, 1),
            ("num_proc", num_proc, 0))  # fmt: skip
    for name, value, low in lows:
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if shard_tokens < batch_size * seq_len:
        raise ValueError(
            f"shard_tokens must hold one scoring batch, at least batch_size * seq_len = {batch_size * seq_len}, "
            f"got {shard_tokens}"
        )


def _everywhere(fn: Any, rank: int) -> Any:
    """``fn()`` on rank 0, its result (or its error, raised again) on every rank."""
    result: Any = None
    if rank == 0:
        try:
            result = ("ok", fn())
        except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
            result = ("error", e)
    kind, value = from_rank_zero(result)
    if kind == "error":
        raise value
    return value


def score_corpus(
    model: nn.Module,
    tokenizer: Any,
    corpus: str | os.PathLike | Sequence[np.ndarray],
    out_dir: str | os.PathLike,
    *,
    seq_len: int,
    batch_size: int = 8,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    docs_per_block: int = DEFAULT_DOCS_PER_BLOCK,
    num_proc: int = 1,
    text_column: str = "text",
    timing: dict[str, float] | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Score a corpus with the reference ``model`` into Arrow shards under ``out_dir``; return the manifest.

    ``corpus`` is a corpus path (`rho_fused.stream.CorpusSource`: streamed, tokenized and packed a
    block of ``docs_per_block`` documents at a time, in ``num_proc`` worker processes when above 1)
    or token rows in memory. Each block's rows are scored ``batch_size`` at a time and appended to
    shards of at most ``shard_tokens`` tokens (`rho_fused.shards`), written as they fill into
    ``OUT.partial``; the manifest ``rho_fused.json`` is written last, then the directory is renamed
    to ``out_dir``. Memory does not grow with the corpus. ``resume=True`` continues an interrupted
    run after its last complete shard, giving the output an uninterrupted run gives.

    Under torch.distributed every rank calls with the same arguments: block ``b`` is scored by rank
    ``b % world`` and written by it (no gather); rank 0 writes the manifest once all are done. The
    output is the one a single process writes. ``timing``, when given, receives this rank's scoring
    ``seconds``, the ``tokens`` it scored and ``tokens_per_s``, and ``all_ranks_tokens``,
    ``all_ranks_seconds`` (the slowest rank's) and ``all_ranks_tokens_per_s``.

    Every batch's rows are checked before they are scored (`rho_fused.data_checks.check_row`: whole
    number ids within the reference's vocabulary), unless ``check=False`` (the vocabulary bound is
    then still enforced); a non-finite reference loss at a scored position is always refused,
    naming the block, the row and the position (`check_finite`). ``overwrite`` replaces only an
    earlier output of rho-fused (`rho_fused.outputs.check_replaceable`), which carries the marker.
    """
    import time

    from .shards import ShardStore
    from .stream import CorpusSource, RowsSource, rows_of_blocks

    _check_sizes(seq_len, batch_size, shard_tokens, docs_per_block, num_proc)
    rank, world = rank_and_world()
    if from_rank_zero(Path(out_dir).exists()) and not overwrite:  # rank 0's file system decides
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    if overwrite:
        _everywhere(lambda: check_replaceable(out_dir, command="score"), rank)
    if isinstance(corpus, (str, os.PathLike)):
        source: Any = CorpusSource(corpus, text_column=text_column)
    else:
        source = RowsSource(corpus)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": name_of(tokenizer),
        "reference_fingerprint": model_fingerprint(model),
        "reference_name": name_of(model),
        "seq_len": int(seq_len),
    }
    run = {
        **header,
        "corpus_fingerprint": source.fingerprint(),
        "text_column": text_column,
        "batch_size": batch_size,
        "shard_tokens": shard_tokens,
        "docs_per_block": docs_per_block,
        "reference_dtype": str(next(model.parameters()).dtype),
        "backend": backend,
    }
    store = ShardStore(out_dir)
    _everywhere(lambda: store.open(run, resume=resume, create=True), rank)
    done = store.done_blocks()
    vocab = model.get_output_embeddings().weight.shape[0]
    model.eval()

    t0, scored, n_blocks = time.perf_counter(), 0, 0
    bar = tqdm(unit="tok", desc="score", disable=not progress or rank != 0)
    blocks = source.blocks(docs_per_block, wanted=lambda b: b % world == rank and b not in done)
    for item in rows_of_blocks(blocks, tokenizer, seq_len, num_proc):
        n_blocks += 1
        if isinstance(item, int):
            continue  # another rank's block, or one already complete
        index, rows = item
        part, skip = store.resume_point(index)
        writer = None
        try:
            for lo in range(skip, len(rows), batch_size):
                chunk = rows[lo : lo + batch_size]
                if check:
                    for j, r in enumerate(chunk):
                        check_row(r, f"the corpus, block {index}, row {lo + j}", vocab=vocab)
                else:  # ids outside the vocabulary would index out of the embedding: never skipped
                    low, top = min(int(r.min()) for r in chunk), max(int(r.max()) for r in chunk)
                    if low < 0 or top >= vocab:
                        raise DataError(
                            f"the corpus has token ids in [{low}, {top}] (block {index}), "
                            f"outside the reference's vocabulary [0, {vocab})"
                        )
                ce = score_batch(model, chunk, backend=backend)
                check_finite(ce, f"block {index}, row", first=lo)
                tokens = sum(len(r) for r in chunk)
                if writer is not None and writer.tokens + tokens > shard_tokens:
                    writer.close()
                    writer, part = None, part + 1
                if writer is None:
                    writer = store.part_writer(index, part)
                writer.append(chunk, ce)
                scored += tokens
                bar.update(tokens)
            if writer is not None:
                writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        store.finish_block(index)
    bar.close()
    seconds = time.perf_counter() - t0
    # every rank's blocks are complete once every rank has got here (the sums are collectives)
    device = next(model.parameters()).device
    total, slowest = sum_over_ranks([scored], device)[0], -min_over_ranks(-seconds, device)
    if timing is not None:
        timing.update(seconds=seconds, tokens=scored, tokens_per_s=scored / max(seconds, 1e-9))
        timing.update(
            all_ranks_tokens=int(total), all_ranks_seconds=slowest, all_ranks_tokens_per_s=total / max(slowest, 1e-9)
        )

    def finish() -> dict[str, Any]:
        meta = store.write_manifest(header, n_blocks)
        write_marker(store.dir, "score")
        store.publish(overwrite)
        return meta

    return _everywhere(finish, rank)


def check_finite(ref: Sequence[np.ndarray], where: str = "row", first: int = 0) -> None:
    """Refuse reference losses that are not finite at a scored position (1 on), naming the first.

    ``where`` and ``first`` name the rows in the message: row ``j`` of ``ref`` is ``{where} {first + j}``.
    """
    for j, r in enumerate(ref):
        bad = np.flatnonzero(~np.isfinite(r[1:]))
        if bad.size:
            p = int(bad[0]) + 1
            raise DataError(
                f"the reference model's loss is {r[p]} at {where} {first + j}, position {p} ({bad.size} such "
                f"positions in that row): it overflows; score in float32 (--dtype float32) or check the model"
            )


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rho_fused.json`` metadata of a scored dataset directory."""
    recover(path)  # a run killed while replacing this output left the previous one aside
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        partial = Path(path).with_name(Path(path).name + ".partial")
        hint = f"; {partial} holds an interrupted run's shards: continue it with --resume" if partial.is_dir() else ""
        raise FileNotFoundError(f"{path} is not a scored dataset from `rho-fused score`: {META_FILE} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{meta_path} is not valid JSON ({e}): the scored dataset is damaged; score it again") from e
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} holds {type(meta).__name__}, not the JSON object `rho-fused score` writes")
    if meta.get("format") != FORMAT or meta.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r} version {meta.get('format_version')!r}")
    return meta


def check_tokenizer(meta: dict[str, Any], tokenizer: Any, where: str = "the scored dataset") -> None:
    """Raise `FingerprintMismatchError` unless ``tokenizer`` is the one ``meta`` was scored with."""
    have = tokenizer_fingerprint(tokenizer)
    if have != meta["tokenizer_fingerprint"]:
        raise FingerprintMismatchError(
            f"{where} was tokenized and scored with tokenizer {meta['tokenizer_name']!r} "
            f"(fingerprint {meta['tokenizer_fingerprint']}), but the tokenizer given is {name_of(tokenizer)!r} "
            f"(fingerprint {have}): its token ids would not mean the same tokens. Train with the tokenizer "
            f"the corpus was scored with, or score the corpus again with this one."
        )


def _damaged(path: str | os.PathLike, e: BaseException) -> DataError:
    return DataError(f"scored dataset {path} cannot be read ({root_cause(e)}): it is damaged; score it again")


def load_scored(path: str | os.PathLike, tokenizer: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """A scored dataset and its metadata; with ``tokenizer``, refused unless the fingerprints match.

    The rows (``data[i]`` is a dict of ``input_ids`` and ``ref_loss`` numpy arrays) are read from
    the memory-mapped shards (`rho_fused.shards.ScoredShards`), never all loaded; a version 1
    directory (one ``save_to_disk`` dataset) is read memory-mapped by ``datasets``.
    """
    import datasets

    from .shards import ScoredShards

    meta = read_meta(path)
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, where=f"scored dataset {path}")
    if meta["format_version"] == FORMAT_VERSION:
        for shard in meta["shards"]:
            if not (Path(path) / shard["file"]).is_file():
                raise FileNotFoundError(
                    f"scored dataset {path}: shard {shard['file']} listed in {META_FILE} is missing"
                )
        try:
            return ScoredShards(path, meta["shards"]), meta
        except Exception as e:  # a truncated or foreign Arrow file
            raise _damaged(path, e) from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a truncated or foreign Arrow file, a missing state.json
        raise _damaged(path, e) from e
    missing = {"input_ids", "ref_loss"} - set(ds.column_names)
    if missing:
        raise ValueError(f"scored dataset {path} lacks the columns {sorted(missing)} (has {ds.column_names})")
    return ds.with_format("numpy"), meta
