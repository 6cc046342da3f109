"""The CPU matrix products of the chunked backend: which GEMM, in place or not, and in what precision.

- ``linear(x, w, b) = x @ w.T + b`` through oneDNN for fp32 CPU tensors (about twice MKL's rate on
  AMD EPYC), else through ``torch.mm``/``addmm``.
- `in_place`: whether ``d W`` and ``d hidden`` accumulate with ``addmm_`` (MKL) rather than through
  oneDNN's product then an add: measured once per process and precision mode, on this CPU.
- `bf16_products`: bf16 inputs' products in bf16 on a CPU with bf16 units (AMX, AVX512-BF16),
  accumulated and returned in fp32. `bf16_available` also tells the chunked backend where a
  product of bf16 operands with a bf16 result (``d W`` written once) runs at the bf16 rate.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# Whether d W and d hidden accumulate in place (torch.addmm_) rather than through oneDNN's products
# and an add; None: measured once per process and precision mode (`in_place`).
IN_PLACE_PRODUCTS: bool | None = None
# Whether bf16 inputs' products run in bf16 (`bf16_products`); None: where the CPU has bf16 units.
BF16_PRODUCTS: bool | None = None

_measured: dict[str, bool] = {}
# `bf16_products` of every thread: how many are inside, and the mode to restore when the last leaves.
_mode_lock = threading.Lock()
_mode_users = 0
_mode_before: str | None = None


def _onednn_linear():
    """oneDNN's ``x @ w.T + b`` for dense CPU tensors, or None where this torch build lacks it."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w.T (+ b)``, ``b`` per column of the result. ``w`` may be a transposed view; ``x`` is contiguous."""
    # oneDNN has no primitive for an empty inner dimension (D = 0)
    if _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and x.shape[1]:
        return _ONEDNN_LINEAR(x, w, b, "none", [], "")
    return x @ w.T if b is None else torch.addmm(b, x, w.T)


def _matmul_precision() -> str | None:
    """oneDNN's fp32 matmul precision (``"ieee"``, ``"bf16"``, ``"none"``: inherited), None before torch 2.9."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(matmul, "fp32_precision", None)


def in_place(device: torch.device, dtype: torch.dtype) -> bool:
    """`IN_PLACE_PRODUCTS`, else measured on first use in each precision mode: the faster, on this CPU,
    of ``addmm_`` and oneDNN's product then ``add_`` for one backward tile's ``d W_c`` (best of three
    each). oneDNN ran fp32 products about twice as fast as MKL on AMD EPYC; on Intel Xeon they were
    even (bench/NOTES.md)."""
    if device.type != "cpu" or dtype != torch.float32 or _ONEDNN_LINEAR is None:
        return True
    if IN_PLACE_PRODUCTS is not None:
        return IN_PLACE_PRODUCTS
    mode = str(_matmul_precision())
    if mode not in _measured:
        g = torch.Generator().manual_seed(0)
        dz_t, h = torch.randn(256, 384, generator=g), torch.randn(384, 512, generator=g)
        out = torch.zeros(256, 512)

        def best(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        in_place_s = best(lambda: out.addmm_(dz_t, h))
        onednn_s = best(lambda: out.add_(linear(dz_t, h.T)))
        _measured[mode] = in_place_s <= 1.1 * onednn_s
    return _measured[mode]


def _bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AMX tiles or AVX512-BF16 (oneDNN's own check,
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported``, accepts any AVX-512 CPU)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def bf16_available(hidden: Tensor, weight: Tensor) -> bool:
    """Whether `bf16_products` runs products in bf16 for these inputs: both bf16, on a CPU with bf16
    units (or as `BF16_PRODUCTS` says), with a torch that has oneDNN's fp32 precision modes (2.9+)
    and oneDNN's linear. A plain bf16 ``torch.mm`` needs neither; the chunked backend uses bf16
    products only where the modes run too."""
    if hidden.device.type != "cpu" or not hidden.dtype == weight.dtype == torch.bfloat16:
        return False
    if _matmul_precision() is None or _ONEDNN_LINEAR is None:
        return False
    if BF16_PRODUCTS is not None:
        return BF16_PRODUCTS
    return _bf16_units()


@contextlib.contextmanager
def bf16_products(hidden: Tensor, weight: Tensor) -> Iterator[bool]:
    """Within: fp32 products in bf16 where `bf16_available` (oneDNN's fp32 precision mode ``"bf16"``,
    its fp32 accumulator and output), yielding whether they are.

    The operands are the inputs' bf16 values in fp32, so ``hidden @ W^T`` is as exact as in fp32;
    ``d z``, computed in fp32, is rounded to bf16 in ``d z @ W`` and ``d z^T @ hidden``, as PyTorch's
    bf16 backward rounds it; every sum stays in fp32. On AMX this ran 2-3x the fp32 rate
    (bench/NOTES.md).

    The mode is process-wide: meanwhile, fp32 products of other threads run in bf16 too, and
    ``torch.get_float32_matmul_precision()`` raises (the legacy setting disagrees with it). Threads
    inside at once share it; the last to leave restores the mode found by the first to enter.
    """
    global _mode_users, _mode_before
    if not bf16_available(hidden, weight):
        yield False
        return
    matmul = torch.backends.mkldnn.matmul
    with _mode_lock:
        if _mode_users == 0:
            _mode_before = matmul.fp32_precision
            matmul.fp32_precision = "bf16"
        _mode_users += 1
    try:
        yield True
    finally:
        with _mode_lock:
            _mode_users -= 1
            if _mode_users == 0:
                matmul.fp32_precision = _mode_before
