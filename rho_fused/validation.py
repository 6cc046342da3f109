"""Input checks for every public entry point, in one place for all backends.

Each error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .problem import LossProblem

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
SCOPES = ("batch", "sequence", "global")

# The value checks of `check_values` read tensors back to the host: one synchronisation per call.
# The backends run them first thing, inside their operators, so they run under torch.compile too.
# They are skipped while a CUDA graph is captured, where a host read is not allowed; set this to
# False to skip them everywhere (the no-synchronisation tests do).
CHECK_VALUES = True
AUTOCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def refuse_dtensors(**tensors: object) -> None:
    """A DTensor (e.g. an FSDP2-sharded LM head read outside the module's forward) holds a shard, not the tensor."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    for name, t in tensors.items():
        if isinstance(t, DTensor):
            raise TypeError(
                f"{name} must be a plain torch.Tensor, got a DTensor placed {t.placements}, e.g. an LM head "
                f"sharded by FSDP2 (fully_shard) read outside its root module's forward; compute the loss inside that "
                f"forward, where FSDP has gathered the whole weight and reduces its gradient "
                f"(rho_fused.fsdp.forward_through), or, without gradients, pass {name}.full_tensor()"
            )


def make_problem(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_loss: Tensor | None,
    *,
    keep_ratio: float,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    scope: str,
    softcap: float | None,
    group: object = None,
) -> LossProblem:
    """Check the arguments of a loss call and flatten them into a `LossProblem`."""
    hidden = _check_tensor("hidden", hidden)
    weight = _check_tensor("weight", weight)
    targets = _check_tensor("targets", targets)
    if bias is not None:
        bias = _check_tensor("bias", bias)
    refuse_dtensors(hidden=hidden, weight=weight, bias=bias, targets=targets, ref_loss=ref_loss)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)

    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape [N, D] or [B, T, D], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1), got V = 0")
    if bias is not None:
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape [V] = ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")

    lead = hidden.shape[:-1]
    if targets.shape != lead:
        raise ValueError(
            f"targets must have shape {tuple(lead)} (hidden without its last dim), got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    if ref_loss is not None:
        ref_loss = _check_tensor("ref_loss", ref_loss)
        if ref_loss.shape != lead:
            raise ValueError(f"ref_loss must have the shape of targets {tuple(lead)}, got {tuple(ref_loss.shape)}")
        if not ref_loss.dtype.is_floating_point:
            raise TypeError(f"ref_loss must be a floating-point tensor, got {ref_loss.dtype}")

    for name, t in (("weight", weight), ("targets", targets), ("bias", bias), ("ref_loss", ref_loss)):
        if t is not None and t.device != hidden.device:
            raise ValueError(
                f"{name} is on {t.device} but hidden is on {hidden.device}: all tensors must share a device"
            )

    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):  # numpy scalars too
        raise TypeError(f"keep_ratio must be a float in (0, 1], got {type(keep_ratio).__name__}")
    if not (0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "sequence" and targets.dim() != 2:
        raise ValueError(
            f"scope='sequence' needs [B, T] targets (hidden [B, T, D]), got targets of shape {tuple(targets.shape)}"
        )
    if scope == "global" and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("scope='global' selects over all ranks and needs torch.distributed to be initialised")
    if group is not None and scope != "global":
        raise ValueError(f"group is only used with scope='global', got scope={scope!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r} ({type(ignore_index).__name__})")

    compute = torch.promote_types(hidden.dtype, torch.float32)
    n_tokens = targets.numel()
    problem = LossProblem(
        hidden=hidden.reshape(n_tokens, hidden.shape[-1]).contiguous(),
        weight=weight.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        # contiguous: the kernels index targets and ref_loss as flat arrays (a slice or an expanded
        # view would be read wrong)
        targets=targets.reshape(n_tokens).to(torch.int64).contiguous(),
        ref_loss=None if ref_loss is None else ref_loss.reshape(n_tokens).to(compute).contiguous(),
        shape=targets.shape,
        scope=scope,
        groups=targets.shape[0] if scope == "sequence" else 1,
        keep_ratio=float(keep_ratio),
        ignore_index=int(ignore_index),
        reduction=reduction,
        softcap=None if softcap is None else float(softcap),
        group=group,
    )
    return problem


def autocast_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under ``torch.autocast`` on the inputs' device, the LM head's inputs in the autocast dtype.

    ``F.linear`` computes in the autocast dtype, so the loss does too: as on inputs cast to it
    (fp64 is left as it is, as autocast leaves it). The casts are differentiable, so gradients come
    back in the leaves' dtypes.
    """
    device = hidden.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t: Tensor | None) -> Tensor | None:
        return t.to(dtype) if t is not None and t.dtype in AUTOCAST_DTYPES else t

    return cast(hidden), cast(weight), cast(bias)


def check_values(p: LossProblem) -> None:
    """Targets in ``[0, V)`` or ``ignore_index``; ``ref_loss`` finite where the target is valid.

    These checks read tensor values, so they synchronise with the device; see `CHECK_VALUES`.
    """
    if not CHECK_VALUES:
        return
    if p.hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    valid = p.valid
    vocab = p.weight.shape[0]
    bad_target = valid & ((p.targets < 0) | (p.targets >= vocab))
    bad_ref = valid & ~torch.isfinite(p.ref_loss) if p.ref_loss is not None else torch.zeros_like(valid)
    any_bad_target, any_bad_ref = torch.stack([bad_target.any(), bad_ref.any()]).tolist()  # one read-back
    if any_bad_target:
        i = int(bad_target.nonzero()[0, 0])
        raise ValueError(
            f"targets must be in [0, V) = [0, {vocab}) or equal ignore_index ({p.ignore_index}); "
            f"got {int(p.targets[i])} at flattened position {i}"
        )
    if any_bad_ref:
        i = int(bad_ref.nonzero()[0, 0])
        raise ValueError(
            f"ref_loss must be finite where targets are valid; got {float(p.ref_loss[i])} at flattened position {i}"
        )
