"""Test-session set-up: where the Triton kernels run, chosen by the hardware.

On a machine with a CUDA device the triton tests run the compiled kernels on it (``KERNEL_DEVICE``
is ``"cuda"``). Without one they run under Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1``
must be set before triton is first imported, which is why it happens here, at collection time,
and the interpreter's known traps are corrected (`rho_fused.kernels.interpreter`). Setting
``TRITON_INTERPRET=1`` by hand forces the interpreter on a GPU machine too.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
# The device of the tensors the triton tests hand to the kernels.
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
sys.path.insert(0, os.path.dirname(__file__))  # `from cases import ...` wherever pytest starts


if INTERPRET:
    from rho_fused.kernels.interpreter import correct_interpreter

    correct_interpreter()


@pytest.fixture
def kernel_device() -> str:
    """``"cuda"`` where the compiled kernels run, ``"cpu"`` under the interpreter."""
    return KERNEL_DEVICE


@pytest.fixture
def small_blocks(monkeypatch):
    """Triton launchers with 16/32 tiles, so the tiny test shapes span several tiles in every dimension
    and end in partial ones (and the interpreter stays quick); the forward splits the vocabulary in two."""
    from rho_fused.kernels import backward, compact, forward, merge, select

    monkeypatch.setattr(
        forward, "default_config", lambda dtype: forward.ForwardConfig(block_n=16, block_v=32, block_d=16, splits=2)
    )
    monkeypatch.setattr(
        backward,
        "default_config",
        lambda dtype: backward.BackwardConfig(block_n=16, block_v=32, block_d=16, group_n=2, budget_bytes=1),
    )
    monkeypatch.setattr(compact, "DEFAULT_CONFIG", compact.CompactConfig(block=32))
    monkeypatch.setattr(merge, "DEFAULT_CONFIG", merge.MergeConfig(block=32))
    monkeypatch.setattr(select, "DEFAULT_CONFIG", select.SelectConfig(block=32))
