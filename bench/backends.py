"""Forward+backward time and peak memory of rho_fused's own backends, side by side in one run.

    python bench/backends.py --tokens 2048 --dim 512 --vocab 32000 --keep 0.6

Times alternate between backends after a warm-up (medians of ``--reps``); peak memory is
`measure.step_peak_growth` (the step after a first one at the same shape, gradients included),
each backend in a fresh subprocess. CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from measure import CHILD_ENV, step_peak_growth, timed
from methods import Inputs

import rho_fused

BACKENDS = ("reference", "chunked")


def step(backend: str, x: Inputs) -> None:
    """One forward+backward; the gradients are dropped afterwards (their peak is counted)."""
    rho_fused.fused_selective_loss(
        x.hidden, x.weight, x.targets, x.ref_loss, keep_ratio=x.keep_ratio, backend=backend
    ).backward()
    x.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--memory-of", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    x = Inputs.make(args.tokens, args.dim, args.vocab, args.keep)
    if args.memory_of:
        print(json.dumps(step_peak_growth(lambda: step(args.memory_of, x), x.zero_grad, "cpu")))
        return

    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for b in BACKENDS:
        step(b, x)  # warm-up
    for _ in range(args.reps):
        for b in BACKENDS:
            times[b].append(timed(lambda b=b: step(b, x), "cpu"))
    child = [sys.executable, __file__, *sys.argv[1:], "--memory-of"]
    env = {**os.environ, **CHILD_ENV}
    memory = {b: json.loads(subprocess.check_output([*child, b], text=True, env=env)) for b in BACKENDS}
    n, d, v, r = args.tokens, args.dim, args.vocab, args.keep
    print(f"N={n} D={d} V={v} keep={r} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| backend | fwd+bwd median (s) | peak RSS growth (MiB) |")
    print("| --- | --- | --- |")
    for b in BACKENDS:
        print(f"| {b} | {statistics.median(times[b]):.3f} | {memory[b]:.0f} |")
    t_ratio = statistics.median(times["chunked"]) / statistics.median(times["reference"])
    m_ratio = memory["chunked"] / memory["reference"]
    print(f"chunked / reference: time {t_ratio:.2f}x, peak memory growth {m_ratio:.3f}x")


if __name__ == "__main__":
    main()
