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
SELECTIONS = ("topk", "threshold", "sample")
WEIGHTINGS = ("hard", "soft")
REF_REDUCES = ("mean", "min", "max")
# What keep_ratio means when the caller gives none (Rho-1's 1B setting).
DEFAULT_KEEP_RATIO = 0.6

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


def _check_real(name: str, value: object, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    """``value`` as a float within ``low .. high`` (bounds open or closed as asked), or a named error."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in {interval}, got {type(value).__name__}")
    v = float(value)
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if math.isnan(v) or below or above:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def _check_variants(
    keep_ratio: float | None,
    selection: str,
    weighting: str,
    threshold: float | None,
    temperature: float | None,
    generator: object,
    ref_reduce: str,
    z_loss: float,
    label_smoothing: float,
) -> tuple[float, float, float]:
    """The variant options of a loss call; returns ``(keep_ratio, threshold, temperature)`` resolved."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "soft" and selection != "topk":
        raise ValueError(
            f"weighting='soft' weights every valid token and takes no selection rule, got selection={selection!r}"
        )
    rule = "weighting='soft'" if weighting == "soft" else f"selection={selection!r}"
    ratio_applies = weighting == "hard" and selection in ("topk", "sample")
    if keep_ratio is not None and not ratio_applies:
        raise ValueError(
            f"keep_ratio does not apply with {rule} (it keeps by threshold), got keep_ratio={keep_ratio!r}"
        )
    if threshold is not None and ratio_applies:
        raise ValueError(
            f"threshold applies to selection='threshold' and weighting='soft', got threshold={threshold!r} with {rule}"
        )
    if temperature is not None and weighting != "soft":
        raise ValueError(f"temperature applies to weighting='soft' only, got temperature={temperature!r} with {rule}")
    if generator is not None:
        if selection != "sample":
            raise ValueError(f"generator applies to selection='sample' only, got a generator with {rule}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if ref_reduce not in REF_REDUCES:
        raise ValueError(f"ref_reduce must be one of {REF_REDUCES}, got {ref_reduce!r}")
    _check_real("z_loss", z_loss, 0.0, math.inf, low_open=False, high_open=True)
    _check_real("label_smoothing", label_smoothing, 0.0, 1.0, low_open=False, high_open=False)
    if ratio_applies:
        keep_ratio = DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):  # numpy scalars too
            raise TypeError(f"keep_ratio must be a float in (0, 1], got {type(keep_ratio).__name__}")
        if not (0.0 < keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    else:
        keep_ratio = 1.0  # unused: the rule keeps by threshold
    threshold = 0.0 if threshold is None else threshold
    threshold = _check_real("threshold", threshold, -math.inf, math.inf, low_open=True, high_open=True)
    temperature = 1.0 if temperature is None else temperature
    temperature = _check_real("temperature", temperature, 0.0, math.inf, low_open=True, high_open=True)
    return float(keep_ratio), threshold, temperature


def make_problem(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_loss: Tensor | None,
    *,
    keep_ratio: float | None,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    scope: str,
    softcap: float | None,
    group: object = None,
    selection: str = "topk",
    weighting: str = "hard",
    threshold: float | None = None,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
    token_weights: Tensor | None = None,
    ref_reduce: str = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> LossProblem:
    """Check the arguments of a loss call and flatten them into a `LossProblem`.

    ``keep_ratio=None`` means `DEFAULT_KEEP_RATIO` where a ratio applies (top-k and sampling).
    """
    hidden = _check_tensor("hidden", hidden)
    weight = _check_tensor("weight", weight)
    targets = _check_tensor("targets", targets)
    if bias is not None:
        bias = _check_tensor("bias", bias)
    refuse_dtensors(
        hidden=hidden, weight=weight, bias=bias, targets=targets, ref_loss=ref_loss, token_weights=token_weights
    )
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
        several = ref_loss.dim() == len(lead) + 1 and ref_loss.shape[1:] == lead and ref_loss.shape[0] >= 1
        if ref_loss.shape != lead and not several:
            raise ValueError(
                f"ref_loss must have the shape of targets {tuple(lead)} or [K, *targets.shape] "
                f"(K references), got {tuple(ref_loss.shape)}"
            )
        if not ref_loss.dtype.is_floating_point:
            raise TypeError(f"ref_loss must be a floating-point tensor, got {ref_loss.dtype}")
    if token_weights is not None:
        token_weights = _check_tensor("token_weights", token_weights)
        if token_weights.shape != lead:
            raise ValueError(
                f"token_weights must have the shape of targets {tuple(lead)}, got {tuple(token_weights.shape)}"
            )
        if not token_weights.dtype.is_floating_point:
            raise TypeError(f"token_weights must be a floating-point tensor, got {token_weights.dtype}")

    tensors = (("weight", weight), ("targets", targets), ("bias", bias), ("ref_loss", ref_loss))
    for name, t in (*tensors, ("token_weights", token_weights)):
        if t is not None and t.device != hidden.device:
            raise ValueError(
                f"{name} is on {t.device} but hidden is on {hidden.device}: all tensors must share a device"
            )

    keep_ratio, threshold, temperature = _check_variants(
        keep_ratio, selection, weighting, threshold, temperature, generator, ref_reduce, z_loss, label_smoothing
    )
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
    uniform = None
    if selection == "sample":  # U of the sampling keys, drawn once here so that every backend sees it
        uniform = torch.rand(targets.shape, generator=generator, dtype=torch.float32, device=targets.device)
    if ref_loss is not None:
        ref_loss = ref_loss.reshape(*ref_loss.shape[: ref_loss.dim() - len(lead)], n_tokens).to(compute)
    problem = LossProblem(
        hidden=hidden.reshape(n_tokens, hidden.shape[-1]).contiguous(),
        weight=weight.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        # contiguous: the kernels index targets and ref_loss as flat arrays (a slice or an expanded
        # view would be read wrong)
        targets=targets.reshape(n_tokens).to(torch.int64).contiguous(),
        ref_loss=None if ref_loss is None else ref_loss.contiguous(),
        shape=targets.shape,
        scope=scope,
        groups=targets.shape[0] if scope == "sequence" else 1,
        keep_ratio=float(keep_ratio),
        ignore_index=int(ignore_index),
        reduction=reduction,
        softcap=None if softcap is None else float(softcap),
        group=group,
        ref_reduce=ref_reduce,
        selection=selection,
        weighting=weighting,
        threshold=threshold,
        temperature=temperature,
        # a constant of the loss: no gradient reaches it
        token_weights=None
        if token_weights is None
        else token_weights.detach().reshape(n_tokens).to(compute).contiguous(),
        uniform=None if uniform is None else uniform.reshape(n_tokens),
        z_loss=float(z_loss),
        label_smoothing=float(label_smoothing),
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
    bad_ref = torch.zeros_like(valid)
    refs = None if p.ref_loss is None else p.ref_loss if p.ref_loss.dim() == 2 else p.ref_loss[None]  # [K, N]
    if refs is not None:  # every reference finite at valid tokens
        bad_ref = valid & ~torch.isfinite(refs).all(0)
    bad_weight = torch.zeros_like(valid)
    if p.token_weights is not None:
        bad_weight = valid & ~(torch.isfinite(p.token_weights) & (p.token_weights >= 0))
    flags = torch.stack([bad_target.any(), bad_ref.any(), bad_weight.any()]).tolist()  # one read-back
    any_bad_target, any_bad_ref, any_bad_weight = flags
    if any_bad_target:
        i = int(bad_target.nonzero()[0, 0])
        raise ValueError(
            f"targets must be in [0, V) = [0, {vocab}) or equal ignore_index ({p.ignore_index}); "
            f"got {int(p.targets[i])} at flattened position {i}"
        )
    if any_bad_ref:
        i = int(bad_ref.nonzero()[0, 0])
        values = refs[:, i].tolist()
        value = values[0] if len(values) == 1 else values
        raise ValueError(f"ref_loss must be finite where targets are valid; got {value} at flattened position {i}")
    if any_bad_weight:
        i = int(bad_weight.nonzero()[0, 0])
        raise ValueError(
            f"token_weights must be finite and >= 0 where targets are valid; got {float(p.token_weights[i])} "
            f"at flattened position {i}"
        )
