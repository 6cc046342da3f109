"""`transformers.Trainer` integration: SLM (or plain causal-LM) training without computing logits.

``SelectiveTrainer(model=..., args=..., train_dataset=scored, keep_ratio=0.6)`` reads ``ref_loss``
from each batch (the column `rho-fused score` writes), computes the loss with `causal_lm_loss`,
and, when the Trainer counts the tokens of the accumulated batch (``num_items_in_batch``),
divides each micro-batch's summed loss by the number of tokens *kept* over the whole accumulated
batch: the gradient is then the one of the mean over every kept token, whatever the accumulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .data import pad_batch
from .hf import causal_lm_loss, kept_count


class SelectiveDataCollator:
    """Pads rows of ``input_ids`` (and ``ref_loss``) into ``input_ids``, ``attention_mask``, ``labels``
    (-100 at padding) and ``ref_loss`` (0 at padding)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, pad_id=self.pad_token_id)


class SelectiveTrainer(Trainer):
    """A `transformers.Trainer` whose loss is the fused selective causal-LM loss.

    ``keep_ratio``: fraction of tokens kept by excess loss (1.0: plain causal LM); ``scope``:
    ``"batch"`` or ``"sequence"``; ``backend``: as in `fused_selective_loss`;
    ``average_over_accumulation``: divide by the kept tokens of the whole accumulated batch
    (``num_items_in_batch``) rather than taking each micro-batch's mean; ``eval_keep_ratio``: the
    keep ratio of evaluation (default 1.0: the plain loss of every token, which needs no ref_loss).
    Training batches need a ``ref_loss`` column when ``keep_ratio < 1``; it is kept by
    ``remove_unused_columns``. Other arguments go to `transformers.Trainer`; the default data
    collator is `SelectiveDataCollator`.

    The loss calls the model's body directly (not the wrapped model's forward): tested on one
    process (CPU or one GPU); multi-process data parallelism (DDP, FSDP) is not tested.
    """

    def __init__(
        self,
        *args: Any,
        keep_ratio: float = 0.6,
        scope: str = "batch",
        backend: str = "auto",
        average_over_accumulation: bool = True,
        eval_keep_ratio: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = SelectiveDataCollator()
        super().__init__(*args, **kwargs)
        self.keep_ratio = keep_ratio
        self.scope = scope
        self.backend = backend
        self.average_over_accumulation = average_over_accumulation
        self.eval_keep_ratio = eval_keep_ratio
        # Have the Trainer count the accumulated batch's tokens, and tell it whether the loss we
        # return is already normalised over the accumulated batch (True) or a micro-batch mean.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = None if average_over_accumulation else False

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "ref_loss" not in self._signature_columns:
            self._signature_columns.append("ref_loss")

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """As `Trainer.get_batch_samples`, with ``num_items_in_batch`` the count of *kept* tokens.

        The Trainer counts the valid (shifted) labels of the accumulated batch, gathered across
        processes when ``average_tokens_across_devices``. With one process the kept count is
        exact; with several, the Trainer's count is scaled by kept/valid over all processes.
        """
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is None or not batch_samples or self.keep_ratio >= 1.0:
            return batch_samples, num_items
        kept = sum(kept_count(b["labels"], self.keep_ratio, scope=self.scope) for b in batch_samples)
        if self.args.world_size <= 1 and self.args.n_gpu <= 1:
            return batch_samples, torch.tensor(kept, device=device)
        valid = sum(int((b["labels"][..., 1:] != -100).sum()) for b in batch_samples)
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
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        keep = self.keep_ratio if model.training else self.eval_keep_ratio
        if keep < 1.0 and ref_loss is None:
            raise ValueError(f"keep_ratio={keep} needs a 'ref_loss' column in the batch (rho-fused score)")
        unwrapped = self.accelerator.unwrap_model(model)
        normalise = model.training and self.average_over_accumulation and num_items_in_batch is not None
        loss = causal_lm_loss(
            unwrapped, input_ids, labels, attention_mask=attention_mask,
            ref_loss=ref_loss if keep < 1.0 else None, keep_ratio=keep, scope=self.scope,
            backend=self.backend, reduction="sum" if normalise else "mean", **inputs,
        )  # fmt: skip
        if normalise:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss
