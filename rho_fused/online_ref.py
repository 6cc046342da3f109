"""The online reference: each training batch scored by a frozen reference model as it arrives.

`rho-fused score` computes ``ref_loss`` once over a corpus; the online reference computes the same
numbers batch by batch, during training, at the cost of one forward of the reference per batch
(no autograd graph, no logits: `token_losses` on its final hidden states). For the same rows it
gives the same ``ref_loss`` as scoring them first, so training with it gives the same weights.

`adapter_free_losses` is the self-reference of a PEFT model: the model under training with its
adapters switched off, which needs no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import DataError
from .hf import head_inputs, next_token_targets, shift_right
from .loss import token_losses
from .problem import IGNORE_INDEX


def frozen_reference(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``model`` moved to ``device``, in eval mode, with no parameter requiring a gradient."""
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def reference_losses(
    ref_model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    backend: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    **model_kwargs: Any,
) -> Tensor:
    """``ref_loss [B, T]`` of a batch, aligned with ``labels`` as `causal_lm_loss` reads it.

    ``ref_loss[b, t] = logsumexp(z) - z[labels[b, t]]`` with ``z`` the reference's logits at
    position ``t - 1``: its cross-entropy for predicting ``labels[b, t]`` from the tokens before
    it; 0 at ``t = 0`` and where ``labels`` is ``ignore_index``. fp32, no autograd graph. The
    reference runs in eval mode (restored afterwards) under the caller's autocast, so it computes
    in the batch's precision; ``model_kwargs`` (``position_ids`` of packed rows, for example) go to
    its body. This is what `rho_fused.scoring.score_rows` stores for the same rows.
    """
    was_training = ref_model.training
    ref_model.eval()
    try:
        hidden, weight, bias, softcap = head_inputs(ref_model, input_ids, attention_mask, **model_kwargs)
        targets = next_token_targets(labels.to(hidden.device), ignore_index)
        ce = token_losses(
            hidden, weight, targets, bias=bias, softcap=softcap, ignore_index=ignore_index, backend=backend
        )
    finally:
        ref_model.train(was_training)
    return shift_right(ce, 0.0)


def adapters_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context in which a PEFT model computes as its base model (its adapters switched off).

    Raises `TypeError` for a model without adapters (no ``disable_adapter`` context).
    """
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise TypeError(
            f"a self-reference needs a PEFT model (with adapters to disable), got {type(model).__name__}; "
            "pass ref_model=... instead"
        )
    return disable()


def adapter_free_losses(model: nn.Module, input_ids: Tensor, labels: Tensor, **kwargs: Any) -> Tensor:
    """`reference_losses` of a PEFT model with its adapters disabled: the base model as the reference."""
    with adapters_disabled(model):
        return reference_losses(model, input_ids, labels, **kwargs)


def load_reference(path: str | os.PathLike, tokenizer: Any, device: torch.device | str | None = None) -> nn.Module:
    """A saved reference model, frozen on ``device``; refused when it cannot score ``tokenizer``'s ids.

    When the directory holds a tokenizer, its fingerprint must be the one of ``tokenizer`` (as
    `rho_fused.scoring.check_tokenizer` demands of a scored dataset); its vocabulary must cover it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .scoring import FingerprintMismatchError, tokenizer_fingerprint

    if not Path(path).exists():
        raise FileNotFoundError(f"--ref-model: reference model directory not found: {path}")
    if (Path(path) / "tokenizer_config.json").is_file():
        own = AutoTokenizer.from_pretrained(path)
        if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
            raise FingerprintMismatchError(
                f"--ref-model {path} has tokenizer {tokenizer_fingerprint(own)}, the training tokenizer is "
                f"{tokenizer_fingerprint(tokenizer)}: the reference would score other tokens"
            )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(f"--ref-model {path}: vocabulary {vocab} is smaller than the tokenizer's {len(tokenizer)}")
    return frozen_reference(model, device)


def corpus_rows_for_training(
    path: str | os.PathLike, tokenizer: Any, seq_len: int, text_column: str = "text"
) -> list[dict[str, np.ndarray]]:
    """Training rows (``input_ids`` only) of a corpus, cut as `rho-fused score` cuts it (for the online reference).

    Packed block by block of the default ``--docs-per-block`` documents, as `score` packs them.
    """
    from .scoring import DEFAULT_DOCS_PER_BLOCK
    from .stream import CorpusSource, block_rows

    source = CorpusSource(path, text_column=text_column)
    rows = [r for b in source.blocks(DEFAULT_DOCS_PER_BLOCK) for r in block_rows(b, tokenizer, seq_len)]
    if not rows:
        raise DataError(f"corpus {path} gave no token rows (is it shorter than one sequence of {seq_len}?)")
    return [{"input_ids": r} for r in rows]
