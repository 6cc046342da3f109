"""Backends: each module computes the same contract (see `rho_fused.fused_selective_loss`).

A backend module exposes ``selective_loss(p) -> (loss, SelectionStats)`` and
``token_losses(p) -> Tensor`` over a `rho_fused.problem.LossProblem`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import chunked, reference

try:  # the kernels need triton, which some platforms lack: only backend="triton" needs it
    from . import triton
except ImportError as error:  # pragma: no cover - triton is installed wherever the tests run
    triton, _TRITON_ERROR = None, error  # e.g. no triton, or rho_fused.kernels not installed

BACKENDS = ("reference", "chunked", "triton")
_MODULES = {"reference": reference, "chunked": chunked, "triton": triton}


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend``; ``"auto"`` is ``triton`` on CUDA, ``chunked`` elsewhere."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if _MODULES[backend] is None:
        raise ImportError(
            f"backend='triton' is unavailable: importing rho_fused.backends.triton failed ({_TRITON_ERROR}); "
            "it needs the triton package and rho-fused installed (pip install -e . maps kernels/ to rho_fused.kernels)"
        )
    return _MODULES[backend]
