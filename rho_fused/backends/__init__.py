"""Backends: each module computes the same contract (see `rho_fused.fused_selective_loss`).

A backend module exposes ``selective_loss(p) -> (loss, SelectionStats)`` and
``token_losses(p) -> Tensor`` over a `rho_fused.problem.LossProblem`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import chunked, reference

BACKENDS = ("reference", "chunked", "triton")


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend``; ``"auto"`` is ``triton`` on CUDA, ``chunked`` elsewhere.

    The triton backend is imported on first use, not with the package: triton reads
    ``TRITON_INTERPRET`` when the kernels are first imported, and some platforms have no triton.
    """
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return reference
    if backend == "chunked":
        return chunked
    try:  # an import statement, which torch.compile traces (importlib.import_module it does not)
        from . import triton
    except ImportError as error:
        raise ImportError(
            f"backend='triton' is unavailable: importing rho_fused.backends.triton failed ({error}); it needs "
            "the triton package and rho-fused installed (pip install -e . maps kernels/ to rho_fused.kernels)"
        ) from error
    return triton
