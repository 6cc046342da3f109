"""Backends: each module computes the same contract (see `rho_fused.fused_selective_loss`).

A backend module exposes ``selective_loss(p) -> (loss, SelectionStats)`` and
``token_losses(p) -> Tensor`` over a `rho_fused.problem.LossProblem`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("reference", "chunked", "triton")


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend``; ``"auto"`` is ``triton`` on CUDA, ``chunked`` elsewhere."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return importlib.import_module(f"{__name__}.{backend}")
