"""`transformers.Trainer` integration: SLM (or plain causal-LM) training without computing logits.

``SelectiveTrainer(model=..., args=..., train_dataset=scored, keep_ratio=0.6)`` reads ``ref_loss``
from each batch (the column `rho-fused score` writes), computes the loss with `causal_lm_loss`,
and, when the Trainer counts the tokens of the accumulated batch (``num_items_in_batch``),
divides each micro-batch's summed loss by the number of tokens *kept* over the whole accumulated
batch: the gradient is then the one of the mean over every kept token, whatever the accumulation.

Data parallel (``torchrun`` + the Trainer's DDP): the loss runs *through* the DDP-wrapped model,
so DDP's gradient synchronisation happens (calling the unwrapped model's body, as a plain
`causal_lm_loss` call would, skips it and leaves each rank with its own gradient).
``scope="global"`` selects over every rank's micro-batch at once (the paper's batch-level
selection when the batch is spread over ranks); ``"batch"`` and ``"sequence"`` select within each
rank's micro-batch. `torch.nn.DataParallel` (several GPUs, one process) is refused: use torchrun.

Online reference: ``SelectiveTrainer(..., ref_model=reference)`` scores each training batch with
the frozen reference as it arrives (`rho_fused.online_ref`) instead of reading a ``ref_loss``
column; ``self_reference=True`` uses the PEFT model under training with its adapters disabled.
The selection statistics (`rho_fused.selection_log.SelectionLog`) join every training log line as
``slm/...`` entries, so ``report_to="tensorboard"`` or ``"wandb"`` receive them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .data import pad_batch
from .fsdp import is_sharded
from .hf import causal_lm_loss, kept_count, valid_count
from .online_ref import adapter_free_losses, frozen_reference, reference_losses
from .problem import keep_count_int
from .ranks import ddp_sum_factor, loss_scope, rank_and_world, sum_over_ranks
from .selection_log import SelectionLog, TokenTrajectory, TrajectoryCallback
from .validation import SCOPES


class SelectiveDataCollator:
    """Pads rows of ``input_ids`` (and ``ref_loss``) into ``input_ids``, ``attention_mask``, ``labels``
    (``ignore_index`` at padding) and ``ref_loss`` (0 at padding): `rho_fused.data.pad_batch`.
    A ``source`` column passes through as a list of strings (the per-source kept fractions)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = pad_batch(rows, pad_id=self.pad_token_id)
        if "source" in rows[0]:
            batch["source"] = [str(r["source"]) for r in rows]
        return batch


class SelectiveTrainer(Trainer):
    """A `transformers.Trainer` whose loss is the fused selective causal-LM loss.

    ``keep_ratio``: fraction of tokens kept by excess loss (1.0: plain causal LM); ``scope``:
    ``"batch"`` (each rank's micro-batch), ``"sequence"``, or ``"global"`` (the micro-batches of
    all ranks together; on one process the same as ``"batch"``); ``backend``: as in `fused_selective_loss`;
    ``average_over_accumulation``: divide by the kept tokens of the whole accumulated batch
    (``num_items_in_batch``) rather than taking each micro-batch's mean; ``eval_keep_ratio``: the
    keep ratio of evaluation (default 1.0: the plain loss of every token, which needs no ref_loss).
    Training batches need a ``ref_loss`` column when ``keep_ratio < 1``; it is kept by
    ``remove_unused_columns``. Other arguments go to `transformers.Trainer`; the default data
    collator is `SelectiveDataCollator`.

    ``ref_model``: a reference model that scores each training batch on the fly (eval mode, no
    graph, on the training device, under the batch's autocast), giving the ``ref_loss`` that
    `rho-fused score` would have stored; the batches then need no ``ref_loss`` column (one is
    refused: two references would be ambiguous). ``self_reference=True``: the reference is the
    PEFT model under training with its adapters disabled (no second copy of the weights).

    Every training log line gets the selection statistics of the micro-batches since the last
    one (`SelectionLog`): ``slm/kept_fraction``, ``slm/threshold``, ``slm/excess_kept``,
    ``slm/excess_dropped``, ``slm/ref_loss`` and, when the rows have a ``source`` column,
    ``slm/kept_fraction/SOURCE``. ``trajectory``: a `TokenTrajectory` recorded every
    ``trajectory.every`` steps and at the last (put its file in ``output_dir`` for ``rho-fused report``).

    What is tested: one process (CPU), and DDP over 2 CPU processes under torchrun with
    ``scope="global"`` (one optimizer step equals the one-process step on the same rows). Under
    DDP the loss is computed as the wrapped model's forward (its ``forward`` swapped for the
    duration of the call), so DDP's hooks run; with ``scope="global"`` over several processes the
    loss is scaled by `rho_fused.ranks.ddp_sum_factor`. FSDP2 (accelerate's plugin, which applies
    ``fully_shard`` to each decoder layer and the model in place): the loss runs as the sharded
    model's forward too, where its LM head is whole; accelerate runs FSDP on GPUs only, so what is
    tested is this loss path on a model sharded the same way over 2 CPU processes (the gradient equals
    the one-process one). Not supported: `torch.nn.DataParallel` (refused), FSDP1 and DeepSpeed
    (untested: their wrappers need the full forward to gather sharded weights).
    """

    pads_own_rows = True  # the default collator is SelectiveDataCollator (subclasses may bring their own)

    def __init__(
        self,
        *args: Any,
        keep_ratio: float = 0.6,
        scope: str = "batch",
        backend: str = "auto",
        average_over_accumulation: bool = True,
        eval_keep_ratio: float = 1.0,
        ref_model: nn.Module | None = None,
        self_reference: bool = False,
        trajectory: TokenTrajectory | None = None,
        **kwargs: Any,
    ) -> None:
        if ref_model is not None and self_reference:
            raise ValueError("pass either ref_model or self_reference=True, not both")
        if kwargs.get("data_collator") is None and self.pads_own_rows:
            kwargs["data_collator"] = SelectiveDataCollator()
        super().__init__(*args, **kwargs)
        self.ref_model = None if ref_model is None else frozen_reference(ref_model, self.args.device)
        self.self_reference = self_reference
        if self_reference and not hasattr(self.model, "disable_adapter"):
            raise ValueError(
                f"self_reference=True needs a PEFT model (its adapters disabled are the reference), "
                f"got {type(self.model).__name__}"
            )
        self.selection_log = SelectionLog()
        if trajectory is not None:
            self.add_callback(TrajectoryCallback(trajectory))
        self.keep_ratio = keep_ratio
        self.scope = scope
        self.backend = backend
        self.average_over_accumulation = average_over_accumulation
        self.eval_keep_ratio = eval_keep_ratio
        # Have the Trainer count the accumulated batch's tokens, and tell it whether the loss we
        # return is already normalised over the accumulated batch (True) or a micro-batch mean.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = None if average_over_accumulation else False
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got scope={scope!r}")

    def _loss_scope(self) -> str:
        """The scope the loss runs with: ``"global"`` only over a process group of size > 1, else ``"batch"``."""
        return loss_scope(self.scope, rank_and_world()[1])

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in ("ref_loss", "source"):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """As `Trainer.get_batch_samples`, with ``num_items_in_batch`` the count of *kept* tokens.

        The Trainer counts the valid (shifted) labels of the accumulated batch, gathered across
        processes when ``average_tokens_across_devices``. With one process the kept count is
        exact; with several, the Trainer's count is scaled by kept/valid over all processes.
        With ``scope="global"`` over several processes the count is exact: every micro-batch's
        ``n_keep`` is taken over the valid tokens of all ranks (one ``all_reduce``).
        """
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._loss_scope() == "global":
            # n_keep of each micro-batch is over all ranks: all-reduce the valid counts (one call, every
            # rank has the same number of micro-batches) and add up the ceil of each.
            valid = sum_over_ranks([valid_count(b["labels"]) for b in batch_samples], device)
            kept = sum(keep_count_int(int(n), self.keep_ratio) for n in valid)
            return batch_samples, torch.tensor(kept, device=device)
        if num_items is None or not batch_samples or self.keep_ratio >= 1.0:
            return batch_samples, num_items
        scope = self._loss_scope()
        kept = sum(kept_count(b["labels"], self.keep_ratio, scope=scope) for b in batch_samples)
        if self.args.world_size <= 1 and self.args.n_gpu <= 1:
            return batch_samples, torch.tensor(kept, device=device)
        valid = sum(valid_count(b["labels"]) for b in batch_samples)
        counts = torch.tensor([kept, valid], dtype=torch.float64, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        return batch_samples, num_items * (counts[0] / counts[1].clamp(min=1))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The fused (selective) causal-LM loss of ``inputs``; ``ref_loss`` is read from them."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        ref_loss = inputs.pop("ref_loss", None)
        sources = inputs.pop("source", None)
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        keep = self.keep_ratio if model.training else self.eval_keep_ratio
        unwrapped = self.accelerator.unwrap_model(model)
        if keep < 1.0 and (self.ref_model is not None or self.self_reference):
            if ref_loss is not None:
                raise ValueError("the batch has a 'ref_loss' column and the trainer an online reference: drop one")
            ref_loss = self.online_ref_loss(unwrapped, input_ids, labels, attention_mask, inputs)
        if keep < 1.0 and ref_loss is None:
            raise ValueError(
                f"keep_ratio={keep} needs a 'ref_loss' column in the batch (rho-fused score), "
                "a ref_model, or self_reference=True"
            )
        if isinstance(model, nn.DataParallel):
            raise ValueError(
                "SelectiveTrainer does not support torch.nn.DataParallel (several GPUs in one process): "
                "launch one process per GPU with torchrun (DDP) instead"
            )
        normalise = model.training and self.average_over_accumulation and num_items_in_batch is not None
        scope = self._loss_scope()  # in training and evaluation
        seen: list[Any] = []  # the SelectionStats of the call, for the log

        def loss_fn() -> torch.Tensor:
            loss, stats = causal_lm_loss(
                unwrapped,
                input_ids,
                labels,
                attention_mask=attention_mask,
                ref_loss=ref_loss if keep < 1.0 else None,
                keep_ratio=keep,
                scope=scope,
                backend=self.backend,
                reduction="sum" if normalise else "mean",
                return_stats=True,
                **inputs,
            )
            seen.append(stats)
            return loss

        loss = run_as_forward(model, unwrapped, loss_fn)
        if model.training:
            self.selection_log.add(seen[0], labels, ref_loss if keep < 1.0 else None, sources)
        if normalise:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)
        # each rank's loss is its share of one global loss (the Trainer's count of the accumulated
        # batch is over all processes), and DDP averages the ranks' gradients (and the Trainer their losses)
        if scope == "global":
            loss = loss * ddp_sum_factor(rank_and_world()[1])
        elif normalise and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * ddp_sum_factor(self.accelerator.num_processes)
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    def online_ref_loss(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """``ref_loss`` of the batch from the online reference (``ref_model``, or ``model``'s adapters off)."""
        kwargs = {"attention_mask": attention_mask, "backend": self.backend, **model_kwargs}
        if self.self_reference:
            return adapter_free_losses(model, input_ids, labels, **kwargs)
        return reference_losses(self.ref_model, input_ids, labels, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """`Trainer.log`, with the selection statistics since the last training log line as ``slm/...``."""
        if "loss" in logs:  # a training log line (evaluation's are eval_*)
            summary = self.selection_log.merged_over_ranks().summary()
            logs.update({f"slm/{k}": v for k, v in summary.items()})
            self.selection_log.reset()
        super().log(logs, *args, **kwargs)


def run_as_forward(wrapper: nn.Module, inner: nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()``, computed as the forward of ``wrapper`` (e.g. `DistributedDataParallel`) around ``inner``.

    DDP synchronises gradients only for a backward that follows a call of the DDP module itself.
    ``inner.forward`` is replaced by ``fn`` for the duration of one call of ``wrapper`` (which
    calls ``inner``), then restored. When ``wrapper`` is ``inner`` (no wrapper), ``fn()`` is called,
    unless ``inner`` is sharded by FSDP2 (accelerate's FSDP2 plugin shards the model in place): its
    hooks gather the LM head only around its own forward, so ``fn`` runs as that forward.
    """
    if wrapper is inner and not is_sharded(inner):
        return fn()
    had_own = "forward" in inner.__dict__
    own = inner.__dict__.get("forward")
    inner.forward = lambda *args, **kwargs: fn()
    try:
        return wrapper()
    finally:
        if had_own:
            inner.forward = own
        else:
            del inner.forward
