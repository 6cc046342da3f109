"""The CPU's matrix products in fp32, in bf16, and in oneDNN's bf16 mode for fp32 operands.

    python bench/bf16_modes.py

A 2048^3 product per mode and thread count, median of 7 GFLOP/s, then the error against fp64 of
the logits ``hidden @ W^T`` (2048 x 512 x 32000, bf16 values) in each mode: the chunked backend's
case for bf16 inputs (`rho_fused.backends.products.bf16_products`). The bf16 mode needs torch 2.9+.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def rate(fn: Callable[[], object], flops: float, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


def main() -> None:
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("AMX tiles:", torch.cpu._is_amx_tile_supported(), " AVX512-BF16:", torch.cpu._is_avx512_bf16_supported())
    n = 2048
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    threads = torch.get_num_threads()
    print("threads | fp32 | bf16 | fp32 in the bf16 mode  (GFLOP/s, 2048^3)")
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            matmul.fp32_precision = "ieee"
            fp32 = rate(lambda: a @ b, 2 * n**3)
            bf16 = rate(lambda: a16 @ b16, 2 * n**3)
            matmul.fp32_precision = "bf16"
            mode = rate(lambda: a @ b, 2 * n**3)
            print(f"{t} | {fp32:.0f} | {bf16:.0f} | {mode:.0f}")
        torch.set_num_threads(threads)
        h = torch.randn(2048, 512, generator=g).bfloat16()
        w = torch.randn(32000, 512, generator=g).bfloat16()
        truth = h.double() @ w.double().T
        matmul.fp32_precision = "bf16"
        in_mode = h.float() @ w.float().T
        matmul.fp32_precision = "ieee"
        ieee = h.float() @ w.float().T
        for name, z in (("fp32 in the bf16 mode", in_mode), ("fp32", ieee), ("bf16 (bf16 output)", h @ w.T)):
            print(f"logits' largest error, {name}: {(z.double() - truth).abs().max().item():.3g}")
    finally:
        matmul.fp32_precision = before


if __name__ == "__main__":
    main()
