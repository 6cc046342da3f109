"""Forward+backward of the SLM loss and of plain CE per method, for pytest-benchmark.

    pytest bench --benchmark-only                       # every available method, one shape
    pytest bench --benchmark-only -k "rho_fused or naive"

Not part of the CI suite (``pytest tests``); no timed assertions, only pytest-benchmark's table.
`bench/run.py` is the full comparison (alternating methods, the floor, memory in subprocesses).
Shape: ``BENCH_SHAPE=NxDxV`` in the environment, default ``1024x512x32000`` (fp32, keep 0.6).
"""

from __future__ import annotations

import os

import pytest
import torch
from methods import TASKS, Inputs, available, step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, D, V = (int(x) for x in os.environ.get("BENCH_SHAPE", "1024x512x32000").split("x"))


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    return Inputs.make(N, D, V, keep_ratio=0.6, device=DEVICE)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", available(DEVICE))
def test_forward_backward(benchmark, inputs: Inputs, method: str, task: str) -> None:
    benchmark.group = f"{task} N={N} D={D} V={V}"
    benchmark.extra_info.update(n=N, d=D, v=V, device=DEVICE)

    def run() -> None:
        step(method, inputs, task)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=1, rounds=3, iterations=1)
    assert inputs.weight.grad is not None and torch.isfinite(inputs.weight.grad).all()
