"""Selective fine-tuning in TRL: `SelectiveSFTTrainer`, a `trl.SFTTrainer` with the fused SLM loss.

TRL prepares the data as usual (chat templates, completion-only and assistant-only labels,
packing, padding-free batches); the loss is `rho_fused.hf.causal_lm_loss` on the labels TRL
built, keeping the ``keep_ratio`` of scored tokens with the largest excess loss. The reference
that the excess is measured against is, in order: ``ref_model`` if given (scored online,
`rho_fused.online_ref`), else, for a PEFT model, the model itself with its adapters disabled (the
base model: no second copy of the weights).

With ``keep_ratio=1.0`` the loss and its gradients are TRL's own ``loss_type="nll"`` (the mean
negative log-likelihood of the label tokens of the accumulated batch). With PEFT LoRA the LM head
is frozen (unless LoRA targets it, which `causal_lm_loss` refuses: its head must be an
``nn.Linear``), and the gradients reach the adapters through the fused loss's hidden states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from trl import SFTTrainer

from .hf_trainer import SelectiveTrainer


class SelectiveSFTTrainer(SelectiveTrainer, SFTTrainer):
    """`trl.SFTTrainer` whose loss is the fused selective loss (Rho-1's SLM applied to fine-tuning).

    ``keep_ratio``: the fraction of label tokens kept by excess loss ``ce - ref_loss`` (1.0: TRL's
    plain loss); ``scope``: ``"batch"`` (each micro-batch; under DDP each rank's) or ``"global"``
    (every rank's micro-batch together); ``"sequence"`` is refused with padding-free or packed
    batches, whose one row holds many sequences. ``ref_model``: a frozen reference scoring each
    batch online; ``self_reference``: the PEFT model with its adapters disabled as the reference
    (default: True for a PEFT model when no ``ref_model`` is given). ``backend``: as in
    `fused_selective_loss`. The other arguments are `trl.SFTTrainer`'s (``peft_config`` included:
    the model it wraps is then the one whose adapters are disabled).

    Logged: TRL's ``loss`` and ``num_tokens``, and the selection statistics ``slm/...``
    (`SelectionLog`); TRL's ``entropy`` and ``mean_token_accuracy`` need the logits and are not computed.
    """

    pads_own_rows = False  # TRL's collator builds the batches

    def __init__(
        self,
        *args: Any,
        keep_ratio: float = 0.6,
        scope: str = "batch",
        backend: str = "auto",
        ref_model: nn.Module | None = None,
        self_reference: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args,
            keep_ratio=keep_ratio,
            scope=scope,
            backend=backend,
            ref_model=ref_model,
            self_reference=bool(self_reference),
            **kwargs,
        )
        if self_reference is None:
            self.self_reference = ref_model is None and hasattr(self.model, "disable_adapter")
        if keep_ratio < 1.0 and self.ref_model is None and not self.self_reference:
            raise ValueError(
                f"keep_ratio={keep_ratio} needs a reference: pass ref_model=..., or train a PEFT model "
                f"(its adapters disabled are the reference); got a {type(self.model).__name__} and no ref_model"
            )
        if scope == "sequence" and self.padding_free:
            raise ValueError(
                "scope='sequence' selects per row, and a padding-free or packed batch holds many sequences in one "
                "row: use scope='batch' or 'global', or padding_free=False without packing"
            )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """`SelectiveTrainer.compute_loss`, counting the tokens seen into TRL's ``num_tokens`` as TRL does."""
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            # padding-free batches have no attention mask: every position of their one row is a token
            mask = inputs.get("attention_mask")
            local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(local.reshape(1)).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
