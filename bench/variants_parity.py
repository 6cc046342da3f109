"""Parity figures of the contract's variants: each backend's largest error against the fp64 truth,
beside PyTorch's own in the same dtype, on the test suite's cases (tests/test_variants.py).

    TRITON_INTERPRET=1 python bench/variants_parity.py            # CPU: triton under the interpreter

One markdown row per variant, backend and dtype: the worst of loss, lse and the gradients, as
``ours / PyTorch's`` (errors relative to the largest value of the truth). The tests hold ``ours``
to PyTorch's plus a small tolerance; this prints by how much each stays inside.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from cases import _listed, max_err, naive_pytorch, run  # noqa: E402
from rho_fused.kernels import backward, compact, forward, merge, select  # noqa: E402
from rho_fused.kernels.interpreter import correct_interpreter  # noqa: E402
from test_variants import VARIANTS, variant_case  # noqa: E402


def small_blocks() -> None:
    """The test suite's small tiles (tests/conftest.py), so the shapes span several tiles."""
    forward.default_config = lambda dtype: forward.ForwardConfig(block_n=16, block_v=32, block_d=16, splits=2)
    backward.default_config = lambda dtype: backward.BackwardConfig(
        block_n=16, block_v=32, block_d=16, group_n=2, budget_bytes=1
    )
    compact.DEFAULT_CONFIG = compact.CompactConfig(block=32)
    merge.DEFAULT_CONFIG = merge.MergeConfig(block=32)
    select.DEFAULT_CONFIG = select.SelectConfig(block=32)


def errors(name: str, backend: str, dtype: torch.dtype) -> tuple[float, float, bool]:
    case, options = variant_case(name, seed=1)
    low = case.to(dtype)
    truth, truth_grads, truth_stats = _listed(run(low.to(torch.float64), "reference", **options))
    ours, grads, stats = _listed(run(low, backend, **options))
    pt, pt_grads, _ = _listed((*naive_pytorch(low, truth_stats, **options), None))
    worst_ours = worst_pt = 0.0
    for a, p, t in zip([*ours, *grads], [*pt, *pt_grads], [*truth, *truth_grads], strict=True):
        if t is None:
            continue
        scale = max(t.abs().max().item(), 1e-3)
        worst_ours = max(worst_ours, max_err(a, t) / scale)
        worst_pt = max(worst_pt, max_err(p, t) / scale)
    return worst_ours, worst_pt, bool(torch.equal(stats.kept, truth_stats.kept))


def main() -> None:
    correct_interpreter()
    small_blocks()
    print(f"torch {torch.__version__}; shapes [5, 13] tokens, D=24, V=97; errors relative to the truth's largest value")
    print("| variant | backend | dtype | kept = truth's | ours | PyTorch |")
    print("| --- | --- | --- | --- | ---: | ---: |")
    for name in VARIANTS:
        for backend in ("chunked", "triton"):
            for dtype in (torch.float32, torch.bfloat16):
                ours, pt, same = errors(name, backend, dtype)
                print(f"| {name} | {backend} | {str(dtype)[6:]} | {same} | {ours:.2e} | {pt:.2e} |", flush=True)


if __name__ == "__main__":
    main()
