"""The compile report: every kernel compiles for sm_80 and sm_90 with the launchers' real configuration
(bf16, and the fp16 / fp32 / bias + softcap variants), none spills, and the 16-bit matmul kernels run
on the tensor cores (HGMMA on sm_90, HMMA on sm_80).

Runs ``python -m rho_fused.kernels.report`` in a subprocess: the test session sets TRITON_INTERPRET=1,
under which ``@triton.jit`` gives interpreter functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

KERNELS = {"compact", "forward", "merge", "select", "backward"}
MATMUL_KERNELS = {"forward", "backward"}
LINE = re.compile(
    r"kernel=(?P<kernel>\w+) arch=sm(?P<arch>\d+) num_warps=\d+ num_stages=\d+ regs=(?P<regs>\d+) "
    r"spill_bytes=(?P<spill>\d+) smem_bytes=(?P<smem>\d+) tensor_core_ops=(?P<tc>\d+)"
)


def _report(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "rho_fused.kernels.report", *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def lines() -> list[dict]:
    return [json.loads(row) for row in _report("--json", "--variants").splitlines() if row.strip()]


def test_every_kernel_on_both_architectures(lines):
    main = [r for r in lines if r["dtype"] == "bfloat16" and not r["extras"]]
    assert {(r["kernel"], r["arch"]) for r in main} == {(k, a) for k in KERNELS for a in (80, 90)}
    variants = {(r["dtype"], r["extras"]) for r in lines}
    assert variants == {("bfloat16", False), ("float16", False), ("float32", False), ("bfloat16", True),
                        ("float16", True)}  # fmt: skip
    for dtype, extras in variants:
        built = {(r["kernel"], r["arch"]) for r in lines if (r["dtype"], r["extras"]) == (dtype, extras)}
        assert {(k, a) for k in MATMUL_KERNELS for a in (80, 90)} <= built, (dtype, extras)


def test_no_spills(lines):
    for r in lines:
        assert r["spill_bytes"] == 0, r
        assert 0 < r["regs"] <= 255, r


def test_tensor_cores(lines):
    for r in lines:
        if r["dtype"] == "float32":  # fp32 inputs take full-precision FMA dots, by design
            assert r["tensor_core_ops"] == 0, r
        elif r["kernel"] in MATMUL_KERNELS:
            if r["arch"] == 90:
                assert r["hgmma"] > 0, f"{r['kernel']} misses the Hopper tensor cores (no HGMMA): {r}"
            else:
                assert r["hmma"] > 0, f"{r['kernel']} misses the tensor cores on sm_80 (no HMMA): {r}"
        else:
            assert r["tensor_core_ops"] == 0, r


def test_shared_memory_fits(lines):
    """Within the per-block limits: 163 KiB (sm_80, A100) and 227 KiB (sm_90, H100)."""
    limit = {80: 163 * 1024, 90: 227 * 1024}
    for r in lines:
        assert r["smem_bytes"] <= limit[r["arch"]], r


def test_line_format(lines):
    text = _report()
    rows = [LINE.fullmatch(row) for row in text.splitlines() if not row.startswith("#")]
    assert rows and all(rows), text
    by_key = {(r["kernel"], r["arch"]): r for r in lines if r["dtype"] == "bfloat16" and not r["extras"]}
    for m in rows:
        r = by_key[(m["kernel"], int(m["arch"]))]
        assert (int(m["regs"]), int(m["spill"]), int(m["smem"]), int(m["tc"])) == (
            r["regs"], r["spill_bytes"], r["smem_bytes"], r["tensor_core_ops"],
        )  # fmt: skip


def test_row_offsets_are_64_bit(lines):
    """row * D of hidden, weight and their gradients can pass 2^31 (V * D = 2^31 at V=256k, D=8k):
    the compiled kernels step [BLOCK, 1] pointer columns by i64 offsets only."""
    for r in lines:
        assert r["narrow_row_offsets"] == 0, r


def test_merge_offsets_are_64_bit(lines):
    """merge reads S slices of N partials: k * N passes 2^31 at S * N >= 2^31, so no pointer in it
    (scalar or vector) may step by an i32 offset (the 32-bit ``k * N`` counted 3 here)."""
    merge = [r for r in lines if r["kernel"] == "merge"]
    assert merge
    for r in merge:
        assert r["narrow_flat_offsets"] == 0, r
