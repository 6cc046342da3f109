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
import signal
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
from .data_checks import check_row, check_rows, data_fingerprint
from .errors import DataError, RunError, Stopped, UsageError
from .hf import causal_lm_loss, kept_count, valid_count
from .online_ref import reference_losses
from .ranges import Range
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
from .stop_signals import StopRequest, stop_requests
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
    checkpoint_every: int = 200  # steps between checkpoints (0: none by steps); also at the end and on a stop
    checkpoint_seconds: float = 1800.0  # seconds between checkpoints (0: none by time)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the ranks (FSDP2; rho_fused.fsdp)

    # fields that may differ between a run and its resumption
    RESUMABLE = ("log_every", "eval_every", "checkpoint_every", "checkpoint_seconds", "backend")

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field outside its range (`CONFIG_RANGES`) or an unknown scope."""
        for name, allowed in CONFIG_RANGES.items():
            allowed.check(name, getattr(self, name))
        if self.scope not in TRAIN_SCOPES:
            raise ValueError(f"scope must be one of {TRAIN_SCOPES} (the global batch, or each row), got {self.scope!r}")


# the allowed values of `TrainConfig`'s numeric fields (the CLI parses its options with them)
CONFIG_RANGES = {
    "steps": Range(1),
    "batch_size": Range(1),
    "accum_steps": Range(1),
    "lr": Range(0.0, low_open=True, integer=False),
    "min_lr": Range(0.0, integer=False),
    "warmup_steps": Range(0),
    "weight_decay": Range(0.0, integer=False),
    "beta1": Range(0.0, 1.0, high_open=True, integer=False),
    "beta2": Range(0.0, 1.0, high_open=True, integer=False),
    "grad_clip": Range(0.0, low_open=True, integer=False, finite=False),
    "keep_ratio": Range(0.0, 1.0, low_open=True, integer=False),
    "seed": Range(0),
    "log_every": Range(1),
    "eval_every": Range(0),
    "checkpoint_every": Range(0),
    "checkpoint_seconds": Range(0.0, integer=False),
}


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
    if count == 0:  # a mean over nothing is no loss at all, not 0
        raise DataError(f"the evaluation data has no predictable token: its {len(rows)} rows are shorter than 2 tokens")
    return total / count


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model and optimizer state, step, RNG (``state["rng"]``, else the current one) and history, atomically.

    Written through a Python file object, so a full disk raises ``OSError(ENOSPC)`` naming the file
    (torch's own file writer reports it as an opaque ``inline_container.cc`` failure).
    """
    with atomic_dir(path) as tmp, open(tmp / "state.pt", "wb") as f:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), **state},
            f,
        )


def load_checkpoint(
    path: Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    data: dict[str, Any] | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """Restore the model, the optimizer and the RNG from ``path``; return the saved ``(step, history)``.

    Refused (`UsageError`, naming both values) unless the checkpoint was written with ``cfg`` (the
    fields of `TrainConfig.RESUMABLE` aside) and, when both record one, on data of the same
    fingerprint (``data``: ``{"fingerprint", "rows", "name"}``, see `data_fingerprint`): another
    config or other data would not continue the same run. An unreadable file is a `DataError`.
    """
    if path is not None:
        recover(path)  # a run killed while replacing its checkpoint left the previous one aside
    if path is None or not (path / "state.pt").is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path / "state.pt", map_location=next(model.parameters()).device, weights_only=False)
        saved_cfg, saved_data = state["config"], state.get("data")
    except Exception as e:  # truncated, empty or foreign: torch says so in several ways
        raise DataError(f"checkpoint {path / 'state.pt'} is unreadable ({type(e).__name__}: {e})") from e
    problem = resume_mismatch(saved_cfg, cfg, saved_data, data)
    if problem:
        raise UsageError(f"cannot resume {path}: {problem}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise UsageError(f"cannot resume {path}: its weights do not fit the model given ({first[0].strip()})") from e
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["history"]


def resume_mismatch(
    saved_cfg: dict[str, Any], cfg: TrainConfig, saved_data: dict[str, Any] | None, data: dict[str, Any] | None
) -> str:
    """Why a checkpoint (its config and data record) cannot be continued with ``cfg`` on ``data``; "" if it can."""
    given = dataclasses.asdict(cfg)
    for k in given:
        if k not in TrainConfig.RESUMABLE and k in saved_cfg and saved_cfg[k] != given[k]:
            option = "--" + k.replace("_", "-")
            return f"{k} ({option}) was {saved_cfg[k]!r} when it was written, now {given[k]!r}: keep it or start anew"
    if saved_data and data and saved_data.get("fingerprint") != data.get("fingerprint"):
        was, now = (
            f"{d.get('name') or 'data'} ({d.get('rows')} rows, fingerprint {d.get('fingerprint')})"
            for d in (saved_data, data)
        )
        return f"it was trained on {was}, the data given is {now}: train on the same data, or start a new run"
    return ""


def check_resumable(path: Path | None, cfg: TrainConfig, data: dict[str, Any]) -> None:
    """Refuse (`UsageError`) to resume the run state at ``path/state.pt`` with ``cfg`` on ``data``.

    For sharded (FSDP) checkpoints, whose small run-state file is read before the shards.
    """
    try:
        state = torch.load(path / "state.pt", weights_only=False) if path is not None else None
    except FileNotFoundError:
        return  # the loader says that there is nothing to resume
    except Exception as e:
        raise DataError(f"checkpoint {path / 'state.pt'} is unreadable ({type(e).__name__}: {e})") from e
    problem = resume_mismatch(state["config"], cfg, state.get("data"), data) if state else ""
    if problem:
        raise UsageError(f"cannot resume {path}: {problem}")


def check_run(data: Sequence[Any], cfg: TrainConfig, world: int, online_ref: bool = False) -> None:
    """Refuse what `train` cannot do: a setting out of range, SLM without ``ref_loss``, a rank with no row."""
    cfg.check()
    if len(data) == 0:
        raise ValueError("the training data has no rows")
    if cfg.keep_ratio < 1.0 and "ref_loss" not in data[0] and not online_ref:
        raise ValueError(
            f"keep_ratio={cfg.keep_ratio} needs a scored dataset with 'ref_loss' (rho-fused score) or a ref_model"
        )
    if online_ref and "ref_loss" in data[0]:
        raise ValueError("the data has a 'ref_loss' column and a ref_model is given: pass one reference, not both")
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
    data_name: str | None = None,
    check_data: bool = True,
    handle_signals: bool = False,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps on ``data`` and return the log.

    ``data`` rows hold ``input_ids`` and, for SLM (``keep_ratio < 1``), ``ref_loss`` (see
    `rho_fused.scoring`). Before the first step every row of ``data`` and ``eval_data`` is checked
    (`rho_fused.data_checks.check_rows`: ids in the model's vocabulary, ``ref_loss`` of the row's
    length and finite where scored, some predictable token), unless ``check_data=False``; each
    batch's rows are checked again as they are read. ``data_name`` names the data in messages
    and in the checkpoint.

    Checkpoints go to ``out_dir/checkpoint`` every ``checkpoint_every`` steps, every
    ``checkpoint_seconds``, at the end and at ``stop_at`` (stopping there: an interrupted run, for
    testing ``resume``). ``resume=True`` continues from ``out_dir/checkpoint``, refused unless the
    config and the data's fingerprint are the checkpoint's. A bad row met during training raises
    `rho_fused.errors.RunError` naming the step and the row, after a checkpoint of the last
    completed step. With ``handle_signals``, SIGINT or SIGTERM end the step under way, write a
    checkpoint and raise `rho_fused.errors.Stopped`.
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
    vocab = model.get_output_embeddings().weight.shape[0]
    need_ref = cfg.keep_ratio < 1.0 and ref_model is None  # an online reference scores each batch itself
    name = data_name or "the training data"
    if check_data:
        check_rows(data, name, vocab=vocab, need_ref_loss=need_ref, progress=progress and rank == 0)
        if eval_data is not None:
            check_rows(eval_data, "the evaluation data", vocab=vocab, progress=progress and rank == 0)
    data_info = {"fingerprint": data_fingerprint(data), "rows": len(data), "name": data_name}
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    device = next(model.parameters()).device
    objective = SelectiveObjective(
        model, keep_ratio=cfg.keep_ratio, scope=loss_scope(cfg.scope, world), backend=cfg.backend
    )
    # FSDP turns the parameters into DTensors: the optimizer is built on them, after sharding
    net = fsdp_.shard(objective, model) if cfg.fsdp else wrap_for_ranks(objective, world)
    optimizer = make_optimizer(model, cfg)
    saver = Checkpointer(ckpt, model, optimizer, cfg, data_info)
    if resume and cfg.fsdp:
        check_resumable(ckpt, cfg, data_info)
        step, history = fsdp_.load_checkpoint(ckpt, model, optimizer, cfg)
    elif resume:
        step, history = load_checkpoint(ckpt, model, optimizer, cfg, data_info)
    else:
        step, history = 0, []
    saver.saved_step = step if resume else -1  # a fresh run has no checkpoint, even of step 0
    if trajectory is not None:
        trajectory.resume(step)
    order = BatchOrder(len(data), cfg.batch_size, cfg.seed)
    shard = slice(*shard_bounds(cfg.batch_size, rank, world))
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", disable=not progress or rank != 0)
    t0, tokens = time.perf_counter(), 0
    with stop_requests() if handle_signals else contextlib.nullcontext(StopRequest()) as stop, bar:
        while step < cfg.steps:
            rng = torch.get_rng_state()  # what a checkpoint of the step before this one holds
            # the learning rate of this step
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # the rows of this step, checked (a bad row stops the run here, its step and row named,
            # after a checkpoint of the steps done); every rank reads the whole global batch
            indices = [order.indices(step * cfg.accum_steps + m) for m in range(cfg.accum_steps)]
            rows = [[data[i] for i in idx] for idx in indices]
            try:
                for idx, micro in zip(indices, rows, strict=True):
                    for i, row in zip(idx, micro, strict=True):
                        check_row(row, f"{name}, row {i}", vocab=vocab, need_ref_loss=need_ref)
            except DataError as e:
                raise RunError(f"step {step + 1} of {cfg.steps}: {e}; {saver.save(step, history, rng)}") from e
            batches = [pad_batch(micro) for micro in rows]

            # forward and backward over the micro-batches; the summed loss of each is divided by the
            # number of tokens kept in the whole accumulated (global) batch, so neither accumulation
            # nor the number of ranks changes the gradient
            n_keep = global_kept_count(batches, cfg)
            n_valid = sum(valid_count(b["labels"]) for b in batches)
            totals, selection = StepTotals(), SelectionLog()
            try:
                for m, full in enumerate(batches):
                    b = {k: v[shard].to(device) for k, v in full.items()}  # this rank's shard
                    if ref_model is not None and cfg.keep_ratio < 1.0:
                        b["ref_loss"] = reference_losses(
                            ref_model,
                            b["input_ids"],
                            b["labels"],
                            attention_mask=b["attention_mask"],
                            backend=cfg.backend,
                        )
                    sync = world > 1 and m < cfg.accum_steps - 1  # DDP / FSDP reduce on the last micro-batch only
                    with fsdp_.gradient_sync_off(net) if sync else contextlib.nullcontext():
                        loss, stats = net(b["input_ids"], b["labels"], b["attention_mask"], b.get("ref_loss"))
                        (loss * (ddp_sum_factor(world) / max(n_keep, 1))).backward()
                    totals.add(loss, stats, b["attention_mask"])
                    selection.add(stats, b["labels"], b.get("ref_loss"))
            except Exception:
                if world == 1:  # several ranks may not all be here: only one process saves on its own
                    optimizer.zero_grad(set_to_none=True)
                    saver.save(step, history, rng)
                raise
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
            # a stop request or the clock, agreed over ranks (one small all-reduce per step)
            stopping, time_due = (v > 0 for v in sum_over_ranks([stop.signum, saver.time_due()], device))
            by_steps = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
            if last or by_steps or time_due or stopping:
                saved = saver.save(step, history)
            if stopping:  # a rank that got no signal itself stops as if on SIGTERM
                signum = stop.signum or signal.SIGTERM
                how = signal.Signals(signum).name
                raise Stopped(f"stopped by {how} after step {step} of {cfg.steps}; {saved}", signum)
            if step == stop_at:
                break
    return history


class Checkpointer:
    """Writes `train`'s checkpoints (rank 0; every rank waits for it) and knows when the last one was."""

    def __init__(
        self,
        path: Path | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        data_info: dict[str, Any],
    ) -> None:
        self.path, self.model, self.optimizer, self.cfg, self.data_info = path, model, optimizer, cfg, data_info
        self.saved_step = -1
        self.saved_at = time.monotonic()

    def time_due(self) -> bool:
        """Whether ``checkpoint_seconds`` have passed since the last checkpoint (or the start)."""
        seconds = self.cfg.checkpoint_seconds
        return bool(seconds) and time.monotonic() - self.saved_at >= seconds

    def save(self, step: int, history: list[dict[str, float]], rng: torch.Tensor | None = None) -> str:
        """Checkpoint the state after ``step`` steps (``rng``: the RNG state then); return a sentence saying where."""
        if self.path is None:
            return "nothing saved (no output directory)"
        if self.saved_step != step:
            state = {"step": step, "history": history, "config": dataclasses.asdict(self.cfg), "data": self.data_info}
            if rng is not None:
                state["rng"] = rng
            if self.cfg.fsdp:  # sharded: every rank writes its shards
                fsdp_.save_checkpoint(self.path, self.model, self.optimizer, state)
            elif rank_and_world()[0] == 0:
                save_checkpoint(self.path, self.model, self.optimizer, state)
            barrier()  # the checkpoint is complete before any rank goes on
            self.saved_step, self.saved_at = step, time.monotonic()
        return f"the checkpoint of step {step} is in {self.path}"


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, *, extra: dict | None = None) -> None:
    """``save_pretrained`` of the model (and tokenizer) into ``out_dir``, atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra:
            write_json(tmp / "rho_fused_train.json", extra)
