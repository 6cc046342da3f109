"""Time and peak memory of the SLM loss (and of plain CE) against the peers, in one run.

    python bench/run.py            # the full grid (19 minutes on 2 CPU cores at 32bfd1e, before the products alone)
    python bench/run.py --quick    # two small shapes, memory of SLM only: under 2 minutes

For each shape: forward+backward of SLM (keep 0.6) and of plain cross-entropy for every method
available (`methods.available`), methods alternating within each repetition after a warm-up,
medians reported; the matmul rate in the inputs' dtype (``--dtype``) in the same alternation, and
the floor ``(2 + 6 r) N D V / rate`` (``6 N D V / rate`` for plain CE) beside each time; then each
method's peak memory growth in a process of its own. Writes ``bench/results/<machine>-<date>.csv``, a
markdown table beside it, and PNG plots of time and memory against N.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import report  # noqa: E402
from methods import TASKS, Inputs, available  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (N, D, V): an N sweep at the smaller head, then the larger vocabulary and the wider hidden size.
FULL_GRID = [
    (512, 512, 32000),
    (1024, 512, 32000),
    (2048, 512, 32000),
    (4096, 512, 32000),
    (8192, 512, 32000),
    (2048, 1024, 32000),
    (512, 512, 128256),
    (2048, 512, 128256),
]
QUICK_GRID = [(512, 512, 32000), (1024, 512, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine_name(device: str) -> str:
    """A short name for the hardware: CPU model and core count (or the GPU's name)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE).group(1)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pass
        name = f"{name}-{os.cpu_count()}cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_shape(text: str) -> tuple[int, int, int]:
    n, d, v = (int(p) for p in text.lower().split("x"))
    return n, d, v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small shapes, 2 repetitions")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="N x D x V, e.g. 2048x512x32000")
    parser.add_argument("--methods", nargs="+", help="a subset of the available methods")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--reps", type=int, help="timed repetitions after the warm-up (default 3; 2 with --quick)")
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="the inputs' dtype; the floor's matmul rate is measured in it (default fp32)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--memory-tasks",
        nargs="+",
        choices=TASKS,
        help="tasks whose peak memory is measured (default all; slm with --quick)",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="start this many busy processes (each spins one core) beside the timing, as CI or a laptop has",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", help="file name stem instead of <machine>-<date>")
    parser.add_argument("--from-csv", type=Path, help="only redraw the tables and plots of an earlier run's CSV")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.from_csv:
        rows = report.read_csv(args.from_csv)
        command = f"python bench/run.py --from-csv {args.from_csv}"
        write_outputs(rows, args.from_csv.parent, args.from_csv.stem, command, csv=False)
        return

    if args.memory_child:
        method, task, n, d, v, keep = json.loads(args.memory_child)
        print(measure.peak_growth_child(method, task, n, d, v, keep, args.device, DTYPES[args.dtype]))
        return

    grid = args.shapes or (QUICK_GRID if args.quick else FULL_GRID)
    reps = args.reps or (2 if args.quick else 3)
    memory_tasks = [] if args.no_memory else args.memory_tasks or (["slm"] if args.quick else args.tasks)
    methods = args.methods or available(args.device)
    machine = machine_name(args.device)
    date = datetime.date.today().isoformat()
    dtype = DTYPES[args.dtype]
    stem = args.tag or f"{machine}-{date}" + ("" if args.dtype == "fp32" else f"-{args.dtype}")
    print(
        f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, methods {methods}",
        flush=True,
    )

    rows: list[report.Row] = []
    for n, d, v in grid:
        x = Inputs.make(n, d, v, args.keep, args.device, dtype=dtype)
        with measure.busy_processes(args.busy):
            times, rates = measure.time_methods(x, methods, args.tasks, reps, args.device, dtype)
        load = os.getloadavg()[0]
        del x
        gemm_rates = {name: measure.median(r) for name, r in rates.items()}
        rate = max(gemm_rates.values())
        gflops = ", ".join(f"{k} {r / 1e9:.0f}" for k, r in gemm_rates.items())
        busy = f", {args.busy} busy processes beside it" if args.busy else ""
        print(f"N={n} D={d} V={v}: load {load:.1f}{busy}, {args.dtype} GEMM GFLOP/s {gflops}", flush=True)
        for task in args.tasks:
            floor = measure.flop_floor(n, d, v, args.keep, task) / rate
            naive_t = measure.median(times[("naive", task)]) if "naive" in methods else math.nan
            products_t = measure.median(times[("products", task)])
            print(f"  {task:3s} products alone {products_t:8.3f} s  x floor {products_t / floor:5.2f}", flush=True)
            grads = (n * d + v * d) * dtype.itemsize / 2**20
            mems = {
                m: (
                    measure.peak_growth(m, task, n, d, v, args.keep, args.device, args.dtype)
                    if task in memory_tasks
                    else math.nan
                )
                for m in methods
            }
            for m in methods:
                t = measure.median(times[(m, task)])
                rows.append(
                    report.Row(
                        machine=machine, date=date, device=args.device, torch=torch.__version__,
                        threads=torch.get_num_threads(), task=task, method=m, n=n, d=d, v=v,
                        keep_ratio=args.keep if task == "slm" else 1.0, reps=reps,
                        time_s=t, time_min_s=min(times[(m, task)]), rate_gflops=rate / 1e9,
                        rate_mm_gflops=gemm_rates["mm"] / 1e9,
                        floor_s=floor, x_floor=t / floor, x_naive=t / naive_t,
                        products_s=products_t, x_products=t / products_t,
                        mem_mib=mems[m], mem_x_naive=mems[m] / mems.get("naive", math.nan), grads_mib=grads,
                        work_mib=mems[m] - grads, load_1min=load,
                        work_x_naive=(mems[m] - grads) / (mems.get("naive", math.nan) - grads),
                        busy=args.busy, dtype=args.dtype,
                    )
                )  # fmt: skip
                print(
                    f"  {task:3s} {m:10s} {t:8.3f} s  x naive {t / naive_t:5.2f}  x floor {t / floor:5.2f}"
                    f"  x products {t / products_t:5.2f}"
                    f"  peak growth {mems[m]:6.0f} MiB ({mems[m] - grads:6.0f} beyond grads)",
                    flush=True,
                )
        report.write_csv(rows, args.out / f"{stem}.csv")  # after every shape: a partial run keeps its data

    write_outputs(rows, args.out, stem, " ".join(["python", "bench/run.py", *sys.argv[1:]]))


def write_outputs(rows: list[report.Row], out: Path, stem: str, command: str, csv: bool = True) -> None:
    """The CSV (unless ``csv`` is false), the markdown tables and the plots of one run."""
    if csv:
        report.write_csv(rows, out / f"{stem}.csv")
    r0 = rows[0]
    text = [
        f"# {stem}",
        "",
        f"`{command}` on {r0.machine} ({r0.device}, {r0.threads} threads), torch {r0.torch}, {r0.dtype}"
        + (f", timed beside {r0.busy} busy processes (one spinning core each)." if r0.busy else "."),
        f"Medians of {r0.reps} alternating repetitions after a warm-up. Floor: matmul flops"
        " ((2 + 6r) N D V for SLM, 6 N D V for plain CE) over the matmul rate in that dtype measured in the same run."
        " Products alone: those products as whole-size GEMMs, each by the fastest GEMM tried, in the same alternation."
        " Memory: peak growth of one forward+backward in a fresh process, gradients included,"
        " measured on the step after a first one at the same shape.",
        "",
    ]
    for task, title in (("slm", f"SLM, keep {r0.keep_ratio if r0.task == 'slm' else 0.6}"), ("ce", "plain CE")):
        if any(r.task == task for r in rows):
            text += [f"## {title}", "", report.summary_table(rows, task), "", report.full_table(rows, task), ""]
    (out / f"{stem}.md").write_text("\n".join(text))
    for d, v in sorted({(r.d, r.v) for r in rows}):
        report.plot(rows, out / f"{stem}-d{d}-v{v}.png", d, v)
    print(f"wrote {out / stem}.csv, .md and plots")


if __name__ == "__main__":
    main()
