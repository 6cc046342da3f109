"""Each option of the contract's variants, timed against plain top-k in one run, one backend.

    python bench/variants.py --tokens 2048 --dim 512 --vocab 32000 --backend chunked
    python bench/variants.py --device cuda --dtype bf16 --backend triton --tokens 8192 --dim 4096 --vocab 128256

Forward+backward of `fused_selective_loss` for plain top-k (keep 0.6) and for each variant, the
variants alternating within each repetition after a warm-up of each; medians of ``--reps``. Prints
one markdown row per variant: its median, and its extra time over plain top-k in the same run
(``variant / topk - 1``). ``--clock cpu`` times the process's CPU seconds (all threads) instead of
wall seconds: on a machine shared with other jobs, wall time measures their load as much as ours.
Threshold and soft rules may keep more rows than 60%, so their backward
does more matmul work: the row says how many tokens they kept. With ``--csv PATH`` the rows are
appended to a CSV as well.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch
from measure import timed
from methods import Inputs

import rho_fused

# name -> options; every one ranks the same excess. The reference losses are drawn around the
# cross-entropy (methods.Inputs), so the excess has both signs and threshold 0 keeps about half.
VARIANTS = {
    "topk": dict(keep_ratio=0.6),
    "threshold": dict(selection="threshold", threshold=0.0),
    "sample": dict(selection="sample", keep_ratio=0.6),
    "soft": dict(weighting="soft"),
    "token_weights": dict(keep_ratio=0.6, token_weights=True),
    "3 references (min)": dict(keep_ratio=0.6, refs=3, ref_reduce="min"),
    "z_loss": dict(keep_ratio=0.6, z_loss=1e-4),
    "label_smoothing": dict(keep_ratio=0.6, label_smoothing=0.1),
    "return_lse (lse gets a gradient)": dict(keep_ratio=0.6, return_lse=True),
}


def _options(name: str, x: Inputs, device: str) -> tuple[dict, torch.Tensor]:
    options = dict(VARIANTS[name])
    ref = x.ref_loss
    if options.pop("refs", None):
        g = torch.Generator(device=device).manual_seed(1)
        ref = ref + 0.3 * torch.randn(3, *ref.shape, generator=g, device=device)
    if options.pop("token_weights", None):
        options["token_weights"] = torch.rand(x.targets.shape, generator=torch.Generator(device=device).manual_seed(2),
                                              device=device)  # fmt: skip
    if options.get("selection") == "sample":
        options["generator"] = torch.Generator(device=device).manual_seed(3)
    return options, ref


def step(name: str, x: Inputs, backend: str, device: str) -> int:
    """One forward+backward; returns the number of kept tokens."""
    options, ref = _options(name, x, device)
    out = rho_fused.fused_selective_loss(
        x.hidden, x.weight, x.targets, ref, backend=backend, return_stats=True, **options
    )  # fmt: skip
    if options.get("return_lse"):
        loss, lse, stats = out
        torch.autograd.backward([loss, lse], [torch.ones_like(loss), torch.full_like(lse, 1e-4)])
    else:
        loss, stats = out
        loss.backward()
    x.zero_grad()
    return int(stats.n_kept.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backend", default="chunked", choices=("reference", "chunked", "triton"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--csv", help="append the rows to this CSV file")
    parser.add_argument("--threads", type=int, help="torch's threads (default: torch's own)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="wall seconds or process CPU seconds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = Inputs.make(args.tokens, args.dim, args.vocab, 0.6, device=args.device, dtype=dtype)

    kept = {name: step(name, x, args.backend, args.device) for name in VARIANTS}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.reps):
        for name in VARIANTS:
            call = lambda n=name: step(n, x, args.backend, args.device)  # noqa: E731
            if args.clock == "cpu":
                start = time.process_time()
                call()
                times[name].append(time.process_time() - start)
            else:
                times[name].append(timed(call, args.device))
    base = statistics.median(times["topk"])
    print(
        f"N={args.tokens} D={args.dim} V={args.vocab} {args.dtype} backend={args.backend} device={args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}, medians of {args.reps}, {args.clock} clock"
    )
    print(f"| variant | kept tokens | fwd+bwd median ({args.clock} s) | extra over top-k |")
    print("| --- | ---: | ---: | ---: |")
    rows = []
    for name in VARIANTS:
        t = statistics.median(times[name])
        rows.append((name, kept[name], t, t / base - 1))
        print(f"| {name} | {kept[name]} | {t:.3f} | {t / base - 1:+.1%} |")
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(
                    [
                        "backend",
                        "device",
                        "dtype",
                        "threads",
                        "clock",
                        "tokens",
                        "dim",
                        "vocab",
                        "variant",
                        "kept",
                        "seconds",
                        "extra",
                    ]
                )
            for name, k, t, extra in rows:
                w.writerow(
                    [
                        args.backend,
                        args.device,
                        args.dtype,
                        torch.get_num_threads(),
                        args.clock,
                        args.tokens,
                        args.dim,
                        args.vocab,
                        name,
                        k,
                        t,
                        extra,
                    ]
                )


if __name__ == "__main__":
    main()
