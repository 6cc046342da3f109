"""The minimal training loop behind ``rho-fused train``: plain causal LM (``keep_ratio=1``) or SLM.

It trains a Hugging Face causal LM; `rho_fused.hf_trainer` does the same inside `transformers.Trainer`.

AdamW, linear warm-up then cosine decay to ``min_lr``, gradient clipping, gradient accumulation
normalised by the tokens kept over the whole accumulated batch, a seed that fixes the data order.
The batch of step ``s`` depends only on ``(seed, s)``, and a checkpoint holds the model, the
optimizer and the RNG state, so resuming from step ``k`` gives the same weights at step ``n`` as
an uninterrupted run. The loss never computes the model's logits (`causal_lm_loss`).

Under ``torchrun`` (torch.distributed initialised before `train` is called, as `rho-fused train` does)
the same global batch is split into contiguous shards, one per rank; ``scope="global"`` selects
over the whole global batch (all ranks' shards, as `fused_selective_loss` does with that scope),
the loss goes through `DistributedDataParallel`, and the weights after each step are the ones one
process gets on the same global batch. Only rank 0 shows progress and writes checkpoints.
With ``fsdp=True`` (``--fsdp``) the model is sharded over the ranks instead (`rho_fused.fsdp`): the
loss runs inside the sharded root's forward, and every rank writes its shards of each checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import fsdp as fsdp_
from .atomic import atomic_dir, recover, write_json
from .data import pad_batch
from .hf import causal_lm_loss, kept_count, valid_count
from .online_ref import reference_losses
from .ranks import (
    barrier,
    ddp_sum_factor,
    loss_scope,
    min_over_ranks,
    rank_and_world,
    shard_bounds,
    sum_over_ranks,
    wrap_for_ranks,
)
from .selection_log import SelectionLog, TokenTrajectory
from .validation import SCOPES

# What `train` selects over: the whole global batch (every rank's shard together), or each row.
# (The loss's per-rank "batch" is not offered: on one process "global" is the same selection.)
TRAIN_SCOPES = tuple(s for s in SCOPES if s != "batch")

CHECKPOINT = "checkpoint"
BAR_FIELDS = ("loss", "kept", "threshold", "tok_per_s", "eval_loss")  # the log entries the progress bar shows


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
    scope: str = "global"  # one of TRAIN_SCOPES
    seed: int = 0
    backend: str = "auto"
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when eval data is given)
    checkpoint_every: int = 0  # 0: checkpoint only at the end (or at stop_at)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the ranks (FSDP2; rho_fused.fsdp)

    # fields that may differ between a run and its resumption
    RESUMABLE = ("log_every", "eval_every", "checkpoint_every", "backend")


class SelectiveObjective(nn.Module):
    """A causal LM with its (selective) summed loss as ``forward``: what `DistributedDataParallel` wraps.

    DDP synchronises gradients only for a backward that follows a forward *through the DDP
    wrapper*; calling the model's body directly (as `causal_lm_loss` does) would skip it and
    leave every rank with its own gradient. Wrapping this module instead runs the body, the LM
    head and the fused loss inside DDP's forward, so every parameter (the body's and an untied
    LM head's) is synchronised. ``forward`` returns ``(sum of the kept tokens' ce, SelectionStats)``.
    """

    def __init__(self, model: nn.Module, *, keep_ratio: float, scope: str, backend: str) -> None:
        super().__init__()
        self.model = model
        self.keep_ratio, self.scope, self.backend = keep_ratio, scope, backend

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, ref_loss: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any]:
        return causal_lm_loss(
            self.model,
            input_ids,
            labels,
            attention_mask=attention_mask,
            ref_loss=ref_loss if self.keep_ratio < 1.0 else None,
            keep_ratio=self.keep_ratio,
            scope=self.scope,
            backend=self.backend,
            reduction="sum",
            return_stats=True,
        )


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
    """Mean cross-entropy per predicted token of ``rows`` (each a dict with ``input_ids``).

    Under torch.distributed, batch ``j`` is evaluated by rank ``j % world`` and the sums are
    all-reduced: every rank returns the same value (every rank must call).
    """
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(rank * batch_size, len(rows), batch_size * world):
        b = pad_batch([rows[i] for i in range(start, min(start + batch_size, len(rows)))], with_ref_loss=False)
        b = {k: v.to(device) for k, v in b.items()}
        loss = causal_lm_loss(
            model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"], reduction="sum", backend=backend
        )
        total += float(loss)
        count += valid_count(b["labels"])
    model.train(was_training)
    total, count = sum_over_ranks([total, count], device)
    return total / max(count, 1)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model and optimizer state, step, RNG and history, written atomically to ``path``."""
    with atomic_dir(path) as tmp:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), **state},
            tmp / "state.pt",
        )


def load_checkpoint(
    path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[int, list[dict[str, float]]]:
    """Restore the model, the optimizer and the RNG from ``path``; return the saved ``(step, history)``.

    Refused unless the checkpoint was written with ``cfg`` (the fields of `TrainConfig.RESUMABLE`
    aside): another config would not continue the same run.
    """
    if path is not None:
        recover(path)  # a run killed while replacing its checkpoint left the previous one aside
    if path is None or not (path / "state.pt").is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state = torch.load(path / "state.pt", map_location=next(model.parameters()).device, weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in TrainConfig.RESUMABLE}
    wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TrainConfig.RESUMABLE}
    if saved != wanted:
        diff = {k: (saved.get(k), wanted.get(k)) for k in wanted if saved.get(k) != wanted.get(k)}
        raise ValueError(f"cannot resume {path}: the config differs (saved, given): {diff}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["history"]


def check_run(data: Sequence[Any], cfg: TrainConfig, world: int, online_ref: bool = False) -> None:
    """Refuse what `train` cannot do: SLM without ``ref_loss``, an unknown scope, a rank with no row."""
    if cfg.keep_ratio < 1.0 and "ref_loss" not in data[0] and not online_ref:
        raise ValueError(
            f"keep_ratio={cfg.keep_ratio} needs a scored dataset with 'ref_loss' (rho-fused score) or a ref_model"
        )
    if online_ref and "ref_loss" in data[0]:
        raise ValueError("the data has a 'ref_loss' column and a ref_model is given: pass one reference, not both")
    if cfg.scope not in TRAIN_SCOPES:
        raise ValueError(f"scope must be one of {TRAIN_SCOPES} (the global batch, or each row), got {cfg.scope!r}")
    if cfg.batch_size < world:
        raise ValueError(f"batch_size={cfg.batch_size} is smaller than the world size {world}: a rank would get no row")
    if cfg.fsdp and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("fsdp=True (--fsdp) shards over the ranks of a process group: launch under torchrun")


def global_kept_count(batches: Sequence[dict[str, torch.Tensor]], cfg: TrainConfig) -> int:
    """The tokens the loss keeps over the micro-batches of a step, all ranks together.

    Every rank holds the whole global batch, so it counts them alone: no collective.
    """
    scope = loss_scope(cfg.scope, 1)
    return sum(kept_count(b["labels"], cfg.keep_ratio, scope=scope) for b in batches)


@dataclass
class StepTotals:
    """What one optimizer step's micro-batches add up to: on this rank, then (`over_ranks`) on all."""

    kept_ce: float = 0.0  # the summed cross-entropy of the kept tokens
    all_ce: float = 0.0  # the summed cross-entropy of every scored token
    tokens: int = 0  # tokens in the batch, padding excluded
    kept: int = 0  # tokens the loss kept
    threshold: float = math.inf  # the smallest kept excess

    def add(self, loss: torch.Tensor, stats: Any, attention_mask: torch.Tensor) -> None:
        """One micro-batch: its summed kept loss, `SelectionStats` and attention mask."""
        self.kept_ce += float(loss.detach())
        self.all_ce += float(stats.ce.sum())
        self.tokens += int(attention_mask.sum())
        self.kept += int(stats.kept.sum())
        self.threshold = min(self.threshold, float(stats.threshold.detach().double().min()))

    def over_ranks(self, device: torch.device) -> StepTotals:
        """The totals of every rank (the sums summed, the threshold the smallest); every rank must call."""
        kept_ce, all_ce, tokens, kept = sum_over_ranks([self.kept_ce, self.all_ce, self.tokens, self.kept], device)
        return StepTotals(kept_ce, all_ce, int(tokens), int(kept), min_over_ranks(self.threshold, device))


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
    ref_model: nn.Module | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    trajectory: TokenTrajectory | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps on ``data`` and return the log.

    ``data`` rows hold ``input_ids`` and, for SLM (``keep_ratio < 1``), ``ref_loss`` (see
    `rho_fused.scoring`). Checkpoints go to ``out_dir/checkpoint`` every ``checkpoint_every``
    steps, at the end and at ``stop_at`` (stopping there: an interrupted run, for testing
    ``resume``). ``resume=True`` continues from ``out_dir/checkpoint`` with the same config.
    The log has one entry per ``log_every`` steps: ``loss`` (mean cross-entropy of the kept
    tokens), ``loss_all`` (of every token), ``kept`` (fraction), ``threshold``, ``lr``,
    ``grad_norm`` (before clipping), ``tok_per_s``, and ``eval_loss`` on ``eval_data`` every
    ``eval_every`` steps and at the end.

    Data parallel: when torch.distributed is initialised with ``world`` ranks, every rank calls
    `train` with the same ``data`` and config. Each micro-batch of ``batch_size`` rows (the global
    batch: the same rows as on one process) is split into ``world`` contiguous shards, rank ``r``
    running shard ``r`` through `DistributedDataParallel`. ``scope="global"`` selects the top
    ``keep_ratio`` over the whole global micro-batch (on one process: the batch), ``"sequence"``
    within each row. Each rank's summed kept loss is divided by the kept count of the whole
    accumulated global batch and scaled by `rho_fused.ranks.ddp_sum_factor`: every rank then holds
    the gradient one process computes, so clipping and the optimizer step are the same. Rank 0
    alone shows a progress bar and writes checkpoints; every rank resumes from them.
    ``batch_size`` must be at least ``world``. With ``cfg.fsdp`` the decoder layers and the root are
    sharded with FSDP2 (the same gradients, reduce-scattered: each rank keeps its shard), checkpoints
    are sharded (every rank writes), and ``model`` is left sharded: `rho_fused.fsdp.plain_copy` gathers it.

    ``ref_model``: the online reference (`rho_fused.online_ref`): each micro-batch's ``ref_loss``
    is computed by this frozen model as it is drawn (``data`` then has no ``ref_loss``); the same
    numbers as scoring ``data`` first, hence the same weights. Log entries also hold
    ``excess_kept``, ``excess_dropped`` and ``ref_loss`` of the step (`SelectionLog`), and go to
    ``on_log`` (on rank 0) as they are made. ``trajectory`` records its held-out sample every
    ``trajectory.every`` steps and at the end, written by rank 0.
    """
    rank, world = rank_and_world()
    check_run(data, cfg, world, online_ref=ref_model is not None)
    if trajectory is not None and cfg.fsdp:  # rank 0 alone records, and a sharded model needs every rank
        raise ValueError("a token trajectory (--trajectory-every) is not recorded under fsdp=True (--fsdp)")
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    device = next(model.parameters()).device
    objective = SelectiveObjective(
        model, keep_ratio=cfg.keep_ratio, scope=loss_scope(cfg.scope, world), backend=cfg.backend
    )
    # FSDP turns the parameters into DTensors: the optimizer is built on them, after sharding
    net = fsdp_.shard(objective, model) if cfg.fsdp else wrap_for_ranks(objective, world)
    optimizer = make_optimizer(model, cfg)
    save, load = (fsdp_.save_checkpoint, fsdp_.load_checkpoint) if cfg.fsdp else (save_checkpoint, load_checkpoint)
    step, history = load(ckpt, model, optimizer, cfg) if resume else (0, [])
    if trajectory is not None:
        trajectory.resume(step)
    order = BatchOrder(len(data), cfg.batch_size, cfg.seed)
    shard = slice(*shard_bounds(cfg.batch_size, rank, world))
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", disable=not progress or rank != 0)
    t0, tokens = time.perf_counter(), 0
    while step < cfg.steps:
        # the learning rate of this step
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward and backward over the micro-batches; the summed loss of each is divided by the
        # number of tokens kept in the whole accumulated (global) batch, so neither accumulation
        # nor the number of ranks changes the gradient
        batches = [
            pad_batch([data[i] for i in order.indices(step * cfg.accum_steps + m)]) for m in range(cfg.accum_steps)
        ]
        n_keep = global_kept_count(batches, cfg)
        n_valid = sum(valid_count(b["labels"]) for b in batches)
        totals, selection = StepTotals(), SelectionLog()
        for m, full in enumerate(batches):
            b = {k: v[shard].to(device) for k, v in full.items()}  # this rank's shard
            if ref_model is not None and cfg.keep_ratio < 1.0:
                b["ref_loss"] = reference_losses(
                    ref_model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"], backend=cfg.backend
                )
            sync = world > 1 and m < cfg.accum_steps - 1  # DDP / FSDP reduce on the last micro-batch only
            with fsdp_.gradient_sync_off(net) if sync else contextlib.nullcontext():
                loss, stats = net(b["input_ids"], b["labels"], b["attention_mask"], b.get("ref_loss"))
                (loss * (ddp_sum_factor(world) / max(n_keep, 1))).backward()
            totals.add(loss, stats, b["attention_mask"])
            selection.add(stats, b["labels"], b.get("ref_loss"))
        totals = totals.over_ranks(device)
        tokens += totals.tokens
        if totals.kept != n_keep:  # the tokens the loss kept, over all ranks, against the count it was divided by
            raise RuntimeError(f"step {step}: the loss kept {totals.kept} tokens, {n_keep} were expected")

        # clip, step, clear (every rank holds the same, globally summed gradient)
        grad_norm = float(fsdp_.full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # log, evaluate, checkpoint
        last = step == cfg.steps or step == stop_at
        eval_now = bool(cfg.eval_every) and step % cfg.eval_every == 0
        if step % cfg.log_every == 0 or last or eval_now:
            entry = {
                "step": step,
                "loss": totals.kept_ce / max(n_keep, 1),
                "loss_all": totals.all_ce / max(n_valid, 1),
                "kept": n_keep / max(n_valid, 1),
                "threshold": totals.threshold,
                "lr": lr,
                "grad_norm": grad_norm,
                "tok_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
            }
            # the step's kept fraction and threshold are already there (exact over the step's ranks)
            extra = selection.merged_over_ranks().summary()
            entry.update({k: v for k, v in extra.items() if k not in ("kept_fraction", "threshold")})
            if eval_data is not None and (eval_now or step == cfg.steps):
                run_eval = functools.partial(fsdp_.evaluate, net) if cfg.fsdp else evaluate
                entry["eval_loss"] = run_eval(model, eval_data, batch_size=cfg.batch_size, backend=cfg.backend)
            history.append(entry)
            if on_log is not None and rank == 0:
                on_log(entry)
            bar.set_postfix({k: f"{entry[k]:.3g}" for k in BAR_FIELDS if k in entry})
        bar.update(1)
        if trajectory is not None and rank == 0 and (last or step % trajectory.every == 0):
            trajectory.record(model, step)
            trajectory.save()
        if last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            if ckpt is not None and (rank == 0 or cfg.fsdp):  # sharded: every rank writes its shards
                state = {"step": step, "history": history, "config": dataclasses.asdict(cfg)}
                save(ckpt, model, optimizer, state)
            barrier()  # the checkpoint is complete before any rank goes on
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
