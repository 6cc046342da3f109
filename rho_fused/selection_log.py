"""Selection statistics where users look: the Trainer's logs, TensorBoard, and a token trajectory.

`SelectionLog` adds up what the selection saw over the micro-batches between two log lines and
gives their summary (``kept_fraction``, ``threshold``, ``excess_kept``, ``excess_dropped``,
``ref_loss``, ``kept_fraction/SOURCE``). `TokenTrajectory` records, at intervals, the per-token
cross-entropy, excess and kept mask of a fixed held-out sample: how each token's loss moves while
training goes on. `TensorBoardLog` writes log entries as TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from .atomic import write_json
from .data import pad_batch
from .hf import causal_lm_loss
from .online_ref import adapter_free_losses, reference_losses
from .problem import IGNORE_INDEX, SelectionStats

TRAJECTORY_FILE = "trajectory.json"
TRAJECTORY_FORMAT = "rho-fused token trajectory"


def scored_mask(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The labels a causal-LM loss scores: past position 0 and other than ``ignore_index`` ([B, T] bool)."""
    mask = labels != ignore_index
    mask[..., 0] = False
    return mask


class SelectionLog:
    """Sums of the selection statistics of the micro-batches seen since the last `reset`.

    Per interval: ``kept_fraction = kept / valid``; ``threshold``: the mean over micro-batches of
    the smallest kept excess (over the batch's selection groups); ``excess_kept`` and
    ``excess_dropped``: the mean excess ``ce - ref_loss`` of the kept and of the dropped valid tokens;
    ``ref_loss``: the mean reference loss of the valid tokens; ``kept_fraction/S``: the kept
    fraction of the tokens of rows whose ``source`` is ``S``. `add` keeps its sums on the
    statistics' device (no host synchronisation per micro-batch); `summary` reads them once.
    """

    FIELDS = ("valid", "kept", "dropped", "excess_kept", "excess_dropped", "ref_loss", "ref_count",
              "threshold", "thresholds")  # fmt: skip

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._pending: list[Tensor] = []  # one [len(FIELDS)] fp64 row per micro-batch, on its device
        self._pending_sources: list[tuple[list[str], Tensor]] = []  # (sources, [2, B] kept and valid per row)
        self.sums: dict[str, float] = dict.fromkeys(self.FIELDS, 0.0)
        self.by_source: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kept, valid

    def add(
        self,
        stats: SelectionStats,
        labels: Tensor,
        ref_loss: Tensor | None = None,
        sources: Sequence[str] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        """One micro-batch: `SelectionStats` aligned with ``labels [B, T]`` (as `causal_lm_loss` returns them)."""
        valid = scored_mask(labels, ignore_index).to(stats.kept.device)
        kept = stats.kept & valid
        dropped = valid & ~kept
        excess = stats.excess.detach().double()
        zero = excess.new_zeros(())
        n_valid = valid.sum().double()
        ref_sum = zero if ref_loss is None else torch.where(valid, ref_loss.to(valid.device).double(), 0.0).sum()
        threshold = stats.threshold.detach().double().reshape(-1)
        finite = torch.isfinite(threshold)
        smallest = torch.where(finite, threshold, torch.inf).min()
        row = [
            n_valid,
            kept.sum().double(),
            dropped.sum().double(),
            torch.where(kept, excess, 0.0).sum(),
            torch.where(dropped, excess, 0.0).sum(),
            ref_sum,
            zero if ref_loss is None else n_valid,
            torch.where(finite.any(), smallest, 0.0),
            finite.any().double(),
        ]
        self._pending.append(torch.stack(row))
        if sources is not None:
            if len(sources) != labels.shape[0]:
                raise ValueError(f"sources: expected one per row of labels ({labels.shape[0]}), got {len(sources)}")
            per_row = torch.stack([kept.reshape(len(sources), -1).sum(-1), valid.reshape(len(sources), -1).sum(-1)])
            self._pending_sources.append(([str(x) for x in sources], per_row))

    def _settle(self) -> None:
        """Move the pending device sums into ``sums`` and ``by_source`` (one read back)."""
        if self._pending:
            totals = torch.stack(self._pending).sum(0).tolist()
            for field, value in zip(self.FIELDS, totals, strict=True):
                self.sums[field] += value
        for sources, per_row in self._pending_sources:
            kept, valid = per_row.tolist()
            for src, k, v in zip(sources, kept, valid, strict=True):
                self.by_source[src][0] += k
                self.by_source[src][1] += v
        self._pending, self._pending_sources = [], []

    def merged_over_ranks(self) -> SelectionLog:
        """This log with every rank's added in (a collective under torch.distributed; every rank must call)."""
        self._settle()
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.sums, dict(self.by_source)))
        out = SelectionLog()
        for sums, by_source in parts:
            for k, v in sums.items():
                out.sums[k] += v
            for src, (k, v) in by_source.items():
                out.by_source[src][0] += k
                out.by_source[src][1] += v
        return out

    def summary(self) -> dict[str, float]:
        """The interval's statistics (keys as in the class docstring); empty when nothing was added."""
        self._settle()
        s = self.sums
        if not s["valid"]:
            return {}
        out = {"kept_fraction": s["kept"] / s["valid"]}
        if s["thresholds"]:
            out["threshold"] = s["threshold"] / s["thresholds"]
        if s["kept"]:
            out["excess_kept"] = s["excess_kept"] / s["kept"]
        if s["dropped"]:
            out["excess_dropped"] = s["excess_dropped"] / s["dropped"]
        if s["ref_count"]:
            out["ref_loss"] = s["ref_loss"] / s["ref_count"]
        for src, (k, v) in sorted(self.by_source.items()):
            if v:
                out[f"kept_fraction/{src}"] = k / v
        return out


class TokenTrajectory:
    """The per-token loss of a fixed held-out sample, recorded at intervals of training.

    ``rows``: dicts with ``input_ids`` (and ``ref_loss`` unless a reference is given). At each
    `record`, the model (in eval mode, no graph) gives every token's ``ce``, ``excess = ce - ref_loss``
    and whether the selection at ``keep_ratio`` (per sequence) keeps it; a training loop records
    every ``every`` steps. `save` writes them with the tokens to ``path`` (JSON, atomically):
    what ``rho-fused report`` draws as its token view.
    ``self_reference=True`` scores the reference as the model with its PEFT adapters disabled.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        path: str | os.PathLike,
        *,
        keep_ratio: float,
        every: int = 100,
        ref_model: nn.Module | None = None,
        self_reference: bool = False,
        backend: str = "auto",
    ) -> None:
        if not rows:
            raise ValueError("TokenTrajectory needs at least one held-out row, got none")
        if every < 1:
            raise ValueError(f"TokenTrajectory: every must be a positive number of steps, got every={every}")
        if ref_model is None and not self_reference and "ref_loss" not in rows[0]:
            raise ValueError("TokenTrajectory rows need a 'ref_loss' column, or pass ref_model / self_reference=True")
        self.batch = pad_batch(list(rows), with_ref_loss=ref_model is None and not self_reference)
        self.lengths = [len(r["input_ids"]) for r in rows]
        self.path = Path(path)
        self.keep_ratio, self.every, self.backend = keep_ratio, every, backend
        self.ref_model, self.self_reference = ref_model, self_reference
        self.records: list[dict[str, Any]] = []

    @torch.no_grad()
    def record(self, model: nn.Module, step: int) -> dict[str, Any]:
        """Score the sample with ``model`` now; the record is kept (and returned) for `save`."""
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in self.batch.items()}
        ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
        if self.self_reference:
            ref = adapter_free_losses(model, ids, labels, attention_mask=mask, backend=self.backend)
        elif self.ref_model is not None:
            ref = reference_losses(self.ref_model, ids, labels, attention_mask=mask, backend=self.backend)
        else:
            ref = b["ref_loss"]
        was_training = model.training
        model.eval()
        try:
            _, stats = causal_lm_loss(
                model,
                ids,
                labels,
                attention_mask=mask,
                ref_loss=ref,
                keep_ratio=self.keep_ratio,
                scope="sequence",
                reduction="none",
                backend=self.backend,
                return_stats=True,
            )
        finally:
            model.train(was_training)
        rows = range(len(self.lengths))
        entry = {
            "step": int(step),
            "ce": [_rounded(stats.ce[i, : self.lengths[i]]) for i in rows],
            "ref_loss": [_rounded(ref[i, : self.lengths[i]]) for i in rows],
            "excess": [_rounded(stats.excess[i, : self.lengths[i]]) for i in rows],
            "kept": [[int(k) for k in stats.kept[i, : self.lengths[i]].tolist()] for i in rows],
        }
        self.records.append(entry)
        return entry

    def resume(self, step: int) -> None:
        """Continue a run resumed at ``step``: keep the records of ``path`` up to that step."""
        if self.path.is_file():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            self.records = [r for r in saved.get("records", []) if r["step"] <= step]

    def save(self) -> None:
        """Write the tokens and every record so far to ``path`` (replacing it whole)."""
        ids = self.batch["input_ids"]
        write_json(
            self.path,
            {
                "format": TRAJECTORY_FORMAT,
                "keep_ratio": self.keep_ratio,
                "input_ids": [ids[i, :n].tolist() for i, n in enumerate(self.lengths)],
                "records": self.records,
            },
        )


class TrajectoryCallback(TrainerCallback):
    """Records a `TokenTrajectory` in a `transformers.Trainer` every ``trajectory.every`` steps and at the last."""

    def __init__(self, trajectory: TokenTrajectory) -> None:
        self.trajectory = trajectory

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        step = state.global_step
        due = step % self.trajectory.every == 0 or step == state.max_steps
        if due and state.is_world_process_zero and model is not None:
            self.trajectory.record(model, step)
            self.trajectory.save()


def _rounded(x: Tensor) -> list[float]:
    """Values rounded to 5 decimals: enough for a plot, and the JSON stays small."""
    return [round(float(v), 5) for v in x.float().cpu().tolist()]


class TensorBoardLog:
    """Log entries (dicts with a ``step``) as TensorBoard scalars under ``train/`` (``eval_*``: ``eval/``)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ValueError(f"TensorBoard logging needs the tensorboard package (pip install tensorboard): {e}") from e
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, entry: Mapping[str, float]) -> None:
        step = int(entry["step"])
        for key, value in entry.items():
            if key == "step" or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
