"""bench/roofline.py's model counts what the kernels are designed to do: (2 + 6r) N D V matmul flops
for forward plus backward, against 6 N D V for the materialising baseline, launched as the launchers
launch (`rho_fused.kernels.plan`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from rho_fused.kernels import backward, forward
from rho_fused.kernels.plan import H100_SMS, launch_plan

from rho_fused.problem import keep_count_int

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


def _h100_plan(n, d, v, keep):
    """The plan the launchers would make on an H100 (132 SMs) for bf16 rows, every one valid."""
    bf16 = torch.bfloat16
    return launch_plan(
        n,
        d,
        v,
        bf16,
        sms=H100_SMS,
        capacity=keep_count_int(n, keep),
        forward_config=forward.default_config(bf16),
        backward_config=backward.default_config(bf16),
    )


@pytest.mark.parametrize("keep", [0.6, 1.0, 0.25])
def test_model_launches_what_the_launchers_launch(keep):
    """Every shape of the model takes its splits and chunks from the launch plan: the merge reads the
    forward's ``3 x splits x N`` fp32 partials, and the dH matmul moves one fp32 product per chunk."""
    for n, d, v in [(n, d, v) for n in roofline.NS for d in roofline.DS for v in roofline.VS]:
        plan = _h100_plan(n, d, v, keep)
        assert roofline.plan(n, d, v, keep) == plan
        parts = {name: hbm for name, _, hbm, _ in roofline.fused(n, d, v, keep)}
        assert parts["merge"] == pytest.approx(3 * plan.forward.splits * n * 4 + n * (8 + 4) + 3 * n * 4)
        k = keep * n
        dh = k * v * 2 + v * d * 2 + plan.backward.chunks * 4 * k * d * 4
        assert parts["backward dH = dz W (cuBLAS)"] == pytest.approx(dh)


def test_published_launch_figures():
    """The README's figures at N=8192 D=4096 V=128256 bf16 on 132 SMs, keep 0.6: the forward splits
    the vocabulary 17 ways (8 programs per SM), the backward takes Vc = 54528 columns, 3 chunks of
    C = 4916 kept rows."""
    plan = _h100_plan(8192, 4096, 128256, 0.6)
    assert H100_SMS == 132
    assert plan.forward.splits == 17 and plan.forward.row_tiles == 64
    assert plan.forward.splits * plan.forward.v_per_split >= 128256
    assert plan.backward.capacity == 4916
    assert plan.backward.chunk_columns == 54528 and plan.backward.chunks == 3
