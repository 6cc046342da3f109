"""The chunked backend never creates a tensor of N x V elements, forward or backward."""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import rho_fused
from rho_fused.backends import chunked

N, D, V = 64, 16, 50


class LargestOutput(TorchDispatchMode):
    """Records the element count of every tensor any ATen op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(backend: str, softcap: float | None) -> int:
    case = make_case((N,), D, V, bias=True, ref="random", softcap=softcap)
    with LargestOutput() as mode:
        loss = rho_fused.fused_selective_loss(
            case.hidden, case.weight, case.targets, case.ref_loss, bias=case.bias, softcap=softcap, backend=backend
        )
        loss.backward()
    return mode.largest


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_never_materialises_logits(monkeypatch, softcap):
    rows = 8
    monkeypatch.setattr(chunked, "FORWARD_BUDGET_BYTES", rows * V * 4 * 2)
    monkeypatch.setattr(chunked, "BACKWARD_BUDGET_BYTES", rows * V * 4)
    # Inputs and their gradients are N x D and V x D; one chunk of logits is rows x V.
    allowed = max(N * D, V * D, rows * V)
    assert allowed < N * V // 2
    assert largest_tensor("chunked", softcap) <= allowed


def test_detector_sees_the_reference_logits():
    """The recorder is not blind: the reference backend's full logits show up."""
    assert largest_tensor("reference", None) >= N * V
