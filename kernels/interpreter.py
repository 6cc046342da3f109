"""Corrections of Triton's CPU interpreter (``TRITON_INTERPRET=1``), so that it computes what the GPU does.

Only for proving kernels without a GPU: the test suite and ``bench/gpu_check.py --smoke`` apply
them; nothing on a GPU does, and the kernels themselves are never changed to please the
interpreter. `correct_interpreter` applies both, once.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def correct_interpreter() -> None:
    """Apply `patch_dot` and `patch_bf16_rounding` (idempotent)."""
    patch_dot()
    patch_bf16_rounding()


def patch_dot() -> None:
    """Give the interpreter's ``tl.dot`` fp32 copies of 16-bit operands.

    Known trap (triton 3.9): the interpreter stores bf16 as raw uint16 and its dot
    multiplies those bits, and fp16 dots come out wrong too. On a GPU the tensor cores take 16-bit
    operands exactly and accumulate in fp32, which is what an fp32 product of the same values
    computes; so the kernels keep their 16-bit operands and only the interpreter is corrected.
    """
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


def patch_bf16_rounding() -> None:
    """Round fp32 -> bf16 casts to nearest even in the interpreter, as the GPU does.

    The interpreter of triton 3.9 truncates those casts (its cast path passes no rounding mode),
    while ``x.to(tl.bfloat16)`` compiles to ``cvt.rn.bf16.f32`` on the GPU; a truncating cast
    doubles and biases the rounding error of every bf16 value a kernel produces.
    """
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
