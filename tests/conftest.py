"""Test-session set-up: where the Triton kernels run, chosen by the hardware.

On a machine with a CUDA device the triton tests run the compiled kernels on it (``KERNEL_DEVICE``
is ``"cuda"``). Without one they run under Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1``
must be set before triton is first imported, which is why it happens here, at collection time,
and the interpreter's known traps are corrected below. Setting ``TRITON_INTERPRET=1`` by hand
forces the interpreter on a GPU machine too.
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


def _patch_interpreter_dot() -> None:
    """Give the interpreter's ``tl.dot`` fp32 copies of 16-bit operands.

    Known trap (triton 3.9): the interpreter stores bf16 as raw uint16 and its dot
    multiplies those bits, and fp16 dots come out wrong too. On a GPU the tensor cores take 16-bit
    operands exactly and accumulate in fp32, which is what an fp32 product of the same values
    computes; so the kernels keep their 16-bit operands and only the interpreter is corrected.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no triton: the triton tests fail on import, visibly
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_rho_fused_fp32", False):
        return
    original = builder.create_dot

    def to_fp32(h):
        if h.dtype.scalar == tl.bfloat16:
            bits = h.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        if h.dtype.scalar == tl.float16:
            return interpreter.TensorHandle(h.data.astype(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, to_fp32(a), to_fp32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._rho_fused_fp32 = True
    builder.create_dot = create_dot


def _patch_interpreter_bf16_rounding() -> None:
    """Round fp32 -> bf16 casts to nearest even in the interpreter, as the GPU does.

    The interpreter of triton 3.9 truncates those casts (its cast path passes no rounding mode),
    while ``x.to(tl.bfloat16)`` compiles to ``cvt.rn.bf16.f32`` on the GPU; a truncating cast
    doubles and biases the rounding error of every bf16 value a kernel produces.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_rho_fused_rtne", False):
        return
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded = np.where(nan, np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._rho_fused_rtne = True
    builder.cast_impl = cast_impl


if INTERPRET:
    _patch_interpreter_dot()
    _patch_interpreter_bf16_rounding()


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
