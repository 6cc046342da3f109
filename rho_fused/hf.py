"""Hugging Face glue: the (selective) causal-LM loss of a `transformers` model without its logits.

`causal_lm_loss` runs the model's body, takes the final hidden states and the LM head's weight,
applies the causal shift and hands both to `fused_selective_loss`: the ``[tokens x vocab]``
logits that ``model(..., labels=labels)`` would build are never materialised.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import validation
from .loss import fused_selective_loss
from .problem import IGNORE_INDEX, SelectionStats, keep_count_int
from .validation import SCOPES, refuse_dtensors


def lm_head_of(model: nn.Module) -> tuple[Tensor, Tensor | None, float | None, float]:
    """The LM head of a causal LM as ``(weight [V, D], bias [V] or None, softcap, logit_scale)``.

    ``weight`` is the output embedding (tied to the input embedding or not); ``softcap`` is the
    config's ``final_logit_softcapping`` (Gemma 2 and later), ``logit_scale`` the factor the model
    multiplies its logits by before the softcap (``logit_scale`` of Cohere models, ``1 / logits_scaling``
    of Granite models), 1.0 for most models.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"model must be a causal LM whose get_output_embeddings() is an nn.Linear LM head, "
            f"got {type(head).__name__} from {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(text_config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(text_config.logits_scaling)
    if getattr(model, "logit_scale", None) is not None and not isinstance(model.logit_scale, nn.Module):
        scale *= float(model.logit_scale)  # Cohere: logits * logit_scale
    return head.weight, head.bias, (float(softcap) if softcap else None), scale


def model_body(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM: the module that returns the final (normed) hidden states."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise TypeError(f"cannot find the decoder body of {type(model).__name__} (get_decoder() / base_model)")
    return body


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **model_kwargs: object
) -> Tensor:
    """Final hidden states ``[B, T, D]`` of a causal LM's body: the input of its LM head."""
    model_kwargs.setdefault("use_cache", False)
    out = model_body(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_inputs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **model_kwargs: object
) -> tuple[Tensor, Tensor, Tensor | None, float | None]:
    """``(hidden, weight, bias, softcap)`` such that the model's logits are ``cap(hidden @ weight.T + bias)``.

    The final hidden states and the LM head, with a logit scale folded in:
    ``scale * (h @ W.T + b) = (scale * h) @ W.T + scale * b``.
    """
    weight, bias, softcap, scale = lm_head_of(model)
    refuse_dtensors(weight=weight, bias=bias)  # FSDP2 outside the root's forward: say so before running the body
    hidden = final_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return hidden, weight, bias, softcap


def shift_left(x: Tensor, fill: float | int) -> Tensor:
    """``x[:, 1:]`` padded with ``fill`` at the end: position ``t`` then holds what position ``t`` predicts."""
    return torch.cat([x[..., 1:], x.new_full((*x.shape[:-1], 1), fill)], dim=-1)


def shift_right(x: Tensor, fill: float | int) -> Tensor:
    """The inverse of `shift_left`: ``fill`` at position 0, ``x[:, :-1]`` after it."""
    return torch.cat([x.new_full((*x.shape[:-1], 1), fill), x[..., :-1]], dim=-1)


def next_token_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """What each position predicts: ``labels[..., t + 1]`` at position ``t``, ``ignore_index`` at the last.

    The causal shift moves the targets, never the hidden states: ``hidden[t]`` predicts
    ``labels[t + 1]``, and no copy of the ``[B, T, D]`` activations is made.
    """
    return shift_left(labels, ignore_index)


def valid_count(labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> int:
    """How many of ``labels [B, T]`` a causal-LM loss scores: those past position 0, other than ``ignore_index``."""
    return int((labels[..., 1:] != ignore_index).sum())


def _check_ids(model: nn.Module, input_ids: Tensor) -> None:
    """``input_ids`` integers in ``[0, V_in)``, the input embedding's rows (reads values: see `CHECK_VALUES`)."""
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor (int64), got {input_ids.dtype}")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    if not validation.CHECK_VALUES or rows is None or input_ids.numel() == 0:
        return
    low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()  # one read back, not two
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids must be in [0, {rows}) (the model's input embedding), got {bad}")


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    ref_loss: Tensor | None = None,
    keep_ratio: float = 1.0,
    scope: str = "batch",
    backend: str = "auto",
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    return_stats: bool = False,
    **model_kwargs: object,
) -> Tensor | tuple[Tensor, SelectionStats]:
    """The (selective) causal-LM loss of a Hugging Face model, without computing its logits.

    ``labels [B, T]`` are aligned with ``input_ids`` as for ``model(input_ids, labels=labels)``:
    the token at position ``t`` is predicted from positions ``< t``, position 0 is never a target,
    and ``ignore_index`` (-100) marks tokens that are not scored (set it at padding). ``ref_loss
    [B, T]`` is aligned with ``labels``: ``ref_loss[b, t]`` is the reference model's loss for
    predicting ``labels[b, t]`` (what ``rho-fused score`` stores; position 0 is unused).

    The model's body runs on ``input_ids`` and ``attention_mask`` (plus ``model_kwargs``); its
    final hidden states and the LM head's weight (and bias, logit scale and softcap, if the model
    has them) go to `fused_selective_loss` with ``keep_ratio``, ``scope``, ``reduction`` and
    ``backend``. With ``keep_ratio=1.0`` and no ``ref_loss`` the loss equals
    ``model(input_ids, attention_mask=attention_mask, labels=labels).loss``.

    With ``return_stats=True`` also returns the `SelectionStats`, with ``ce``, ``excess`` and
    ``kept`` aligned with ``labels`` (0 / False at position 0 and at ignored labels).
    Llama-family (Llama, Mistral, Qwen2, Gemma 2, ...) and GPT-2 models are supported.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if ref_loss is not None and ref_loss.shape != labels.shape:
        raise ValueError(f"ref_loss must have the shape of labels {tuple(labels.shape)}, got {tuple(ref_loss.shape)}")
    _check_ids(model, input_ids)
    hidden, weight, bias, softcap = head_inputs(model, input_ids, attention_mask, **model_kwargs)
    targets = next_token_targets(labels.to(hidden.device), ignore_index)
    shifted_ref = None if ref_loss is None else shift_left(ref_loss.to(hidden.device, torch.float32), 0.0)
    out = fused_selective_loss(
        hidden,
        weight,
        targets,
        shifted_ref,
        keep_ratio=keep_ratio,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        scope=scope,
        softcap=softcap,
        backend=backend,
        return_stats=return_stats,
    )
    if not return_stats:
        return out
    loss, stats = out
    if reduction == "none":
        loss = shift_right(loss, 0.0)
    stats = SelectionStats(
        ce=shift_right(stats.ce, 0.0),
        excess=shift_right(stats.excess, 0.0),
        kept=shift_right(stats.kept, False),
        threshold=stats.threshold,
        n_kept=stats.n_kept,
        n_valid=stats.n_valid,
    )
    return loss, stats


def kept_count(
    labels: Tensor,
    keep_ratio: float,
    *,
    scope: str = "batch",
    ignore_index: int = IGNORE_INDEX,
    group: torch.distributed.ProcessGroup | None = None,
) -> int:
    """How many tokens `causal_lm_loss` keeps for these ``labels [B, T]`` (step 5 of the contract).

    ``n_keep = ceil(keep_ratio * n_valid)`` per selection group, at least 1 when ``n_valid >= 1``,
    with ``keep_ratio`` read as the nearest fraction of denominator at most 10^6, and ``n_valid``
    the labels other than ``ignore_index`` past position 0. Gradient accumulation divides the
    summed loss of every micro-batch by the total of this count over the accumulated batch.

    ``scope="global"`` counts over every rank of ``group`` (default: the default process group),
    each rank passing its own ``labels``: a collective (one ``all_reduce``) that every rank must
    call, returning the same count everywhere, the number of tokens kept over all ranks.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got scope={scope!r}")
    valid = labels[..., 1:] != ignore_index
    if scope == "global":
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("kept_count(scope='global') counts over all ranks and needs torch.distributed initialised")
        total = valid.sum().reshape(1).to(torch.int64)
        torch.distributed.all_reduce(total, group=group)
        counts = [int(total)]
    elif scope == "batch":
        counts = [int(valid.sum())]
    else:
        counts = valid.reshape(-1, valid.shape[-1]).sum(-1).tolist()
    return sum(keep_count_int(n, keep_ratio) for n in counts)
