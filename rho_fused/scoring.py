"""Scoring a corpus with a reference model: the per-token ``ref_loss`` that SLM training reads.

`score_corpus` writes a `datasets` dataset with two columns, ``input_ids`` and ``ref_loss``
(aligned: ``ref_loss[t]`` is the reference model's loss for predicting ``input_ids[t]`` from the
tokens before it; ``ref_loss[0] = 0``), plus ``rho_fused.json`` holding the fingerprints of the
tokenizer and the reference model and the sequence length. `load_scored` reads it back and
refuses it when its tokenizer fingerprint is not the one of the tokenizer in hand.

Under torch.distributed (``torchrun``) the scoring batches are dealt to the ranks in turn, the
per-row results gathered on rank 0, which alone writes: the output is the one a single process
writes, batch for batch the same computation.
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

from .atomic import atomic_dir, recover, write_json
from .data import pad_batch
from .hf import head_inputs, next_token_targets, shift_right
from .loss import token_losses
from .ranks import from_rank_zero, gather_to_rank_zero, rank_and_world

META_FILE = "rho_fused.json"
FORMAT = "rho-fused scored corpus"
FORMAT_VERSION = 1


class FingerprintMismatchError(ValueError):
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
    """Per-token reference losses of token rows (fp32, aligned with the tokens, 0 at position 0).

    The model's body gives the final hidden states; `token_losses` turns them into per-token
    cross-entropy without materialising the logits. Rows are batched by length to limit padding.
    ``shard=(rank, world)`` scores only the batches ``rank, rank + world, ...`` of that order
    (the others are None in the result): the same batches, hence the same numbers, as one process.
    """
    rank, world = shard
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    starts = range(rank * batch_size, len(order), batch_size * world)
    out: list[np.ndarray | None] = [None] * len(rows)
    total = sum(len(rows[i]) for start in starts for i in order[start : start + batch_size])
    bar = tqdm(total=total, unit="tok", desc="score", disable=not progress)
    for start in starts:
        idx = order[start : start + batch_size]
        batch = pad_batch([{"input_ids": rows[i]} for i in idx])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden, weight, bias, softcap = head_inputs(model, ids, mask)
        targets = next_token_targets(batch["labels"].to(device))
        ce = token_losses(hidden, weight, targets, bias=bias, softcap=softcap, backend=backend)
        ce = shift_right(ce, 0.0).float().cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = ce[j, : len(rows[i])].copy()
        bar.update(int(mask.sum()))
    bar.close()
    return out


def score_corpus(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[np.ndarray],
    out_dir: str | os.PathLike,
    *,
    seq_len: int,
    batch_size: int = 8,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score token rows with the reference ``model`` and write the scored dataset to ``out_dir``.

    The dataset (columns ``input_ids`` int32 and ``ref_loss`` float32) and ``rho_fused.json`` are
    written to a temporary directory renamed to ``out_dir`` when complete. Returns the metadata.

    Under torch.distributed every rank calls with the same rows: each scores its share of the
    batches, rank 0 gathers the results and writes (the others return the same metadata once it
    has). An existing ``out_dir`` without ``overwrite`` is refused on every rank before any work.
    """
    import datasets

    if not rows:
        raise ValueError("the corpus gave no token rows to score (is it shorter than one sequence?)")
    rank, world = rank_and_world()
    if from_rank_zero(Path(out_dir).exists()) and not overwrite:  # rank 0's file system decides
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    vocab = model.get_output_embeddings().weight.shape[0]
    top = max(int(r.max()) for r in rows)
    if top >= vocab:
        raise ValueError(f"the corpus has token id {top}, outside the reference model's vocabulary of {vocab}")
    ref = score_rows(
        model, rows, batch_size=batch_size, backend=backend, progress=progress and rank == 0, shard=(rank, world)
    )
    if world > 1:
        parts = gather_to_rank_zero({i: r for i, r in enumerate(ref) if r is not None})
        if rank != 0:
            return from_rank_zero(None)  # rank 0's metadata, once it has written
        for part in parts:
            for i, r in part.items():
                ref[i] = r
    n_tokens = sum(len(r) for r in rows)
    n_scored = sum(len(r) - 1 for r in rows)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": name_of(tokenizer),
        "reference_fingerprint": model_fingerprint(model),
        "reference_name": name_of(model),
        "seq_len": int(seq_len),
        "n_sequences": len(rows),
        "n_tokens": int(n_tokens),
        "mean_ref_loss": float(sum(float(r.sum()) for r in ref) / max(n_scored, 1)),
    }
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "ref_loss": datasets.Sequence(datasets.Value("float32")),
        }
    )
    ds = datasets.Dataset.from_dict({"input_ids": list(rows), "ref_loss": ref}, features=features)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        ds.save_to_disk(str(tmp))
        write_json(tmp / META_FILE, meta)
    return from_rank_zero(meta)  # the other ranks wait for it above


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rho_fused.json`` metadata of a scored dataset directory."""
    recover(path)  # a run killed while replacing this output left the previous one aside
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a scored dataset from `rho-fused score`: {META_FILE} is missing")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
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


def load_scored(path: str | os.PathLike, tokenizer: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """A scored dataset and its metadata; with ``tokenizer``, refused unless the fingerprints match."""
    import datasets

    meta = read_meta(path)
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, where=f"scored dataset {path}")
    ds = datasets.load_from_disk(str(path))
    missing = {"input_ids", "ref_loss"} - set(ds.column_names)
    if missing:
        raise ValueError(f"scored dataset {path} lacks the columns {sorted(missing)} (has {ds.column_names})")
    return ds.with_format("numpy"), meta
