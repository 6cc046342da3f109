"""The training loop: plain causal LM (``keep_ratio=1``) or SLM, on a Hugging Face causal LM.

AdamW, linear warm-up then cosine decay to ``min_lr``, gradient clipping, gradient accumulation
normalised by the tokens kept over the whole accumulated batch, a seed that fixes the data order.
The batch of step ``s`` depends only on ``(seed, s)``, and a checkpoint holds the model, the
optimizer and the RNG state, so resuming from step ``k`` gives the same weights at step ``n`` as
an uninterrupted run. The loss never computes the model's logits (`causal_lm_loss`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_dir, write_json
from .data import pad_batch
from .hf import causal_lm_loss, kept_count

CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (and how often to log and save)."""

    steps: int = 1000
    batch_size: int = 16
    accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    keep_ratio: float = 1.0
    scope: str = "batch"
    seed: int = 0
    backend: str = "auto"
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when eval data is given)
    checkpoint_every: int = 0  # 0: checkpoint only at the end (or at stop_at)

    # fields that may differ between a run and its resumption
    RESUMABLE = ("log_every", "eval_every", "checkpoint_every", "backend")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


class BatchOrder:
    """Row indices of every micro-batch: epoch ``e`` is a permutation seeded by ``(seed, e)``."""

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        if n_rows == 0:
            raise ValueError("the training data has no rows")
        self.n, self.batch_size, self.seed = n_rows, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, micro_batch: int) -> list[int]:
        start = micro_batch * self.batch_size
        return [int(self._perm(k // self.n)[k % self.n]) for k in range(start, start + self.batch_size)]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-d parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(model: nn.Module, rows: Sequence[Any], *, batch_size: int = 16, backend: str = "auto") -> float:
    """Mean cross-entropy per predicted token of ``rows`` (each a dict with ``input_ids``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        b = pad_batch([rows[i] for i in range(start, min(start + batch_size, len(rows)))], with_ref_loss=False)
        b = {k: v.to(device) for k, v in b.items()}
        total += float(causal_lm_loss(model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"],
                                      reduction="sum", backend=backend))  # fmt: skip
        count += int((b["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model and optimizer state, step, RNG and history, written atomically to ``path``."""
    with atomic_dir(path) as tmp:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), **state},
            tmp / "state.pt",
        )


def train(
    model: nn.Module,
    data: Sequence[Any],
    cfg: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    eval_data: Sequence[Any] | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps on ``data`` and return the log.

    ``data`` rows hold ``input_ids`` and, for SLM (``keep_ratio < 1``), ``ref_loss`` (see
    `rho_fused.scoring`). Checkpoints go to ``out_dir/checkpoint`` every ``checkpoint_every``
    steps, at the end and at ``stop_at`` (stopping there: an interrupted run, for testing
    ``resume``). ``resume=True`` continues from ``out_dir/checkpoint`` with the same config.
    The log has one entry per ``log_every`` steps: ``loss`` (mean cross-entropy of the kept
    tokens), ``loss_all`` (of every token), ``kept`` (fraction), ``threshold``, ``lr``,
    ``tok_per_s``, and ``eval_loss`` on ``eval_data`` every ``eval_every`` steps and at the end.
    """
    if cfg.keep_ratio < 1.0 and "ref_loss" not in data[0]:
        raise ValueError(f"keep_ratio={cfg.keep_ratio} needs a scored dataset with 'ref_loss' (rho-fused score)")
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    order = BatchOrder(len(data), cfg.batch_size, cfg.seed)
    step, history = 0, []
    if resume:
        if ckpt is None or not (ckpt / "state.pt").is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {ckpt}")
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        saved = {k: v for k, v in state["config"].items() if k not in TrainConfig.RESUMABLE}
        wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TrainConfig.RESUMABLE}
        if saved != wanted:
            diff = {k: (saved.get(k), wanted.get(k)) for k in wanted if saved.get(k) != wanted.get(k)}
            raise ValueError(f"cannot resume {ckpt}: the config differs (saved, given): {diff}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, history = state["step"], state["history"]

    def checkpoint() -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, model, optimizer, {"step": step, "history": history,
                                                     "config": dataclasses.asdict(cfg)})  # fmt: skip

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", disable=not progress)
    t0, tokens = time.perf_counter(), 0
    while step < cfg.steps:
        # the learning rate of this step
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward and backward over the micro-batches; the summed loss of each is divided by the
        # number of tokens kept in the whole accumulated batch, so accumulation changes nothing
        batches = [pad_batch([data[i] for i in order.indices(step * cfg.accum_steps + m)])
                   for m in range(cfg.accum_steps)]  # fmt: skip
        n_keep = sum(kept_count(b["labels"], cfg.keep_ratio, scope=cfg.scope) for b in batches)
        loss_sum = ce_sum = n_valid = 0.0
        thresholds = []
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            loss, stats = causal_lm_loss(
                model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"],
                ref_loss=b.get("ref_loss") if cfg.keep_ratio < 1.0 else None,
                keep_ratio=cfg.keep_ratio, scope=cfg.scope, backend=cfg.backend,
                reduction="sum", return_stats=True,
            )  # fmt: skip
            (loss / max(n_keep, 1)).backward()
            loss_sum += float(loss.detach())
            ce_sum += float(stats.ce.sum())
            n_valid += float(stats.n_valid.sum())
            thresholds.append(float(stats.threshold.min()))
            tokens += int(b["attention_mask"].sum())

        # clip, step, clear
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # log, evaluate, checkpoint
        last = step == cfg.steps or step == stop_at
        if step % cfg.log_every == 0 or last or (cfg.eval_every and step % cfg.eval_every == 0):
            dt = time.perf_counter() - t0
            entry = {"step": step, "loss": loss_sum / max(n_keep, 1), "loss_all": ce_sum / max(n_valid, 1),
                     "kept": n_keep / max(n_valid, 1), "threshold": min(thresholds), "lr": lr,
                     "grad_norm": grad_norm, "tok_per_s": tokens / max(dt, 1e-9)}  # fmt: skip
            if eval_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                entry["eval_loss"] = evaluate(model, eval_data, batch_size=cfg.batch_size, backend=cfg.backend)
            history.append(entry)
            bar.set_postfix({k: f"{entry[k]:.3g}" for k in ("loss", "kept", "threshold", "tok_per_s", "eval_loss")
                             if k in entry})  # fmt: skip
        bar.update(1)
        if last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            checkpoint()
        if step == stop_at:
            break
    bar.close()
    return history


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, *, extra: dict | None = None) -> None:
    """``save_pretrained`` of the model (and tokenizer) into ``out_dir``, atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra:
            write_json(tmp / "rho_fused_train.json", extra)
