"""Test-session set-up: Triton kernels run under the interpreter, on CPU tensors.

``TRITON_INTERPRET=1`` must be set before triton is first imported, which is why it happens here,
at collection time. The compiled GPU path is never touched: the compile report test runs
``python -m rho_fused.kernels.report`` in a subprocess without the variable.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(__file__))  # `from cases import ...` wherever pytest starts


def _patch_interpreter_dot() -> None:
    """Give the interpreter's ``tl.dot`` fp32 copies of 16-bit operands.

    Known trap (triton 3.9, see DESIGN.md): the interpreter stores bf16 as raw uint16 and its dot
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


_patch_interpreter_dot()
