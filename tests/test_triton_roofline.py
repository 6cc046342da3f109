"""bench/roofline.py's model counts what the kernels are designed to do: (2 + 6r) N D V matmul flops
for forward plus backward, against 6 N D V for the materialising baseline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("roofline", Path(__file__).parents[1] / "bench" / "roofline.py")
roofline = importlib.util.module_from_spec(SPEC)
sys.modules["roofline"] = roofline  # its dataclass looks its module up there
SPEC.loader.exec_module(roofline)


@pytest.mark.parametrize("keep", [0.6, 1.0, 0.25])
def test_flops(keep):
    n, d, v = 8192, 4096, 128256
    fused = sum(fl for _, fl, _, _ in roofline.fused(n, d, v, keep))
    assert fused == pytest.approx((2 + 6 * keep) * n * d * v)
    assert roofline.baseline(n, d, v)[0] == 6 * n * d * v


def test_table_is_labelled_a_model(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["roofline.py"])
    roofline.main()
    out = capsys.readouterr().out
    assert out.startswith("MODEL (not a measurement)")
    # the fused loss is flop-bound and beats the baseline's time at keep 0.6 on every shape
    for shape, fused_ms, base_ms, ratio in roofline.summary(0.6):
        assert ratio == pytest.approx((2 + 6 * 0.6) / 6)
        assert fused_ms < base_ms, shape


def test_backward_counts_the_dz_round_trip():
    """The backward is the dz kernel and two cuBLAS matmuls, 2kDV flops each (k = keep * N kept rows),
    and its HBM traffic includes dz written once and read twice, 3 * k * V * 2 bytes."""
    n, d, v, keep = 8192, 4096, 128256, 0.6
    parts = {name: (fl, hbm) for name, fl, hbm, _ in roofline.fused(n, d, v, keep) if name.startswith("backward")}
    matmuls = [fl for fl, _ in parts.values() if fl > 0]
    assert len(matmuls) == 3 and all(fl == pytest.approx(2 * keep * n * d * v) for fl in matmuls)
    assert sum(hbm for _, hbm in parts.values()) >= 3 * keep * n * v * 2
    assert roofline.splits(8192, v) == 17 and roofline.chunk_columns(int(keep * n), v) == 54528
