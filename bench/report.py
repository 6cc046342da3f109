"""Results of a run as a CSV, PNG plots against N, and markdown tables."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class Row:
    """One method on one shape and task; times in seconds, memory in MiB."""

    machine: str
    date: str
    device: str
    torch: str
    threads: int
    task: str
    method: str
    n: int
    d: int
    v: int
    keep_ratio: float
    reps: int
    time_s: float  # median forward+backward
    time_min_s: float
    rate_gflops: float  # median GEMM rate in `dtype`, same run, same shape: the faster of torch.mm and oneDNN
    rate_mm_gflops: float  # torch.mm's alone
    floor_s: float  # flop_floor / rate
    x_floor: float  # time_s / floor_s
    x_naive: float  # time_s / naive's time_s
    mem_mib: float  # peak memory growth of one step, own process
    mem_x_naive: float
    grads_mib: float  # of that, the gradients d hidden and d weight (the same for every method)
    work_mib: float  # mem_mib - grads_mib: working memory beyond inputs and gradients
    work_x_naive: float
    load_1min: float = math.nan  # the 1-minute load average when the shape's timing ended (shared cores)
    busy: int = 0  # busy processes (one spinning core each) started beside the timing, --busy
    dtype: str = "fp32"  # the inputs' dtype, --dtype
    products_s: float = math.nan  # the step's products alone, whole-size GEMMs (measure.Products), same run
    x_products: float = math.nan  # time_s / products_s


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(row).items()})


def read_csv(path: Path) -> list[Row]:
    with path.open() as f:
        out = []
        for rec in csv.DictReader(f):
            kw = {}
            for fld in fields(Row):
                if rec.get(fld.name) is not None:  # older CSVs lack later columns
                    kw[fld.name] = {"int": int, "float": float}.get(str(fld.type), str)(rec[fld.name])
            out.append(Row(**kw))
        return out


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}g}" if x < 1000 else f"{x:.0f}"


def _shape(r: Row) -> str:
    return f"{r.n} x {r.d} x {r.v}"


def shapes(rows: Iterable[Row]) -> list[tuple[int, int, int]]:
    return sorted({(r.n, r.d, r.v) for r in rows}, key=lambda s: (s[2], s[1], s[0]))


def full_table(rows: list[Row], task: str) -> str:
    """Every method at every shape: time, ratio to naive and to the floor, memory growth."""
    lines = [
        "| N x D x V | method | fwd+bwd (s) | x naive | x floor | peak growth (MiB) | x naive "
        "| beyond grads (MiB) | x naive |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for shp in shapes(rows):
        group = [r for r in rows if (r.n, r.d, r.v) == shp and r.task == task]
        for r in group:
            lines.append(
                f"| {_shape(r)} | {r.method} | {_fmt(r.time_s)} | {_fmt(r.x_naive, 2)} | {_fmt(r.x_floor, 2)} "
                f"| {_fmt(r.mem_mib)} | {_fmt(r.mem_x_naive, 2)} | {_fmt(r.work_mib)} | {_fmt(r.work_x_naive, 2)} |"
            )
    return "\n".join(lines)


def summary_table(rows: list[Row], task: str, ours: str = "rho_fused") -> str:
    """One line per shape: our time against naive, torch's linear_cross_entropy and the floor."""
    lines = [
        "| N x D x V | floor (s) | products alone (s) | rho_fused (s) | naive (s) | torch lce (s) | cce (s) "
        "| vs naive | vs torch lce | vs floor | vs products | peak growth (MiB) | vs naive "
        "| beyond grads (MiB) | vs naive |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for shp in shapes(rows):
        by = {r.method: r for r in rows if (r.n, r.d, r.v) == shp and r.task == task}
        if ours not in by:
            continue
        o = by[ours]

        def t(m: str, by: dict[str, Row] = by) -> float:
            return by[m].time_s if m in by else math.nan

        lce = t("torch_lce")
        lines.append(
            f"| {_shape(o)} | {_fmt(o.floor_s)} | {_fmt(o.products_s)} | {_fmt(o.time_s)} | {_fmt(t('naive'))} "
            f"| {_fmt(lce)} | {_fmt(t('cce'))} | {_fmt(o.x_naive, 2)} | {_fmt(o.time_s / lce, 2)} "
            f"| {_fmt(o.x_floor, 3)} | {_fmt(o.x_products, 3)} "
            f"| {_fmt(o.mem_mib)} | {_fmt(o.mem_x_naive, 2)} | {_fmt(o.work_mib)} | {_fmt(o.work_x_naive, 2)} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, d: int, v: int) -> bool:
    """Time and memory against N at one (D, V), per method, SLM and CE side by side; False if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.d == d and r.v == v]
    if len({r.n for r in sel}) < 2:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, task in enumerate(("slm", "ce")):
        task_rows = [r for r in sel if r.task == task]
        for method in dict.fromkeys(r.method for r in task_rows):
            mr = sorted((r for r in task_rows if r.method == method), key=lambda r: r.n)
            axes[0, col].plot([r.n for r in mr], [r.time_s for r in mr], marker="o", label=method)
            mem = [r for r in mr if not math.isnan(r.mem_mib)]  # --quick measures SLM's memory only
            axes[1, col].plot([r.n for r in mem], [r.mem_mib for r in mem], marker="o", label=method)
        floor = sorted({(r.n, r.floor_s) for r in task_rows})
        axes[0, col].plot([f[0] for f in floor], [f[1] for f in floor], "k--", label="matmul floor")
        title = "SLM, keep 0.6" if task == "slm" else "plain CE"
        axes[0, col].set_title(f"{title}: forward+backward time")
        axes[1, col].set_title(f"{title}: peak memory growth")
        axes[0, col].set_ylabel("seconds")
        axes[1, col].set_ylabel("MiB")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            if ax.has_data() and any(len(line.get_ydata()) for line in ax.get_lines()):
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[1, col].set_xlabel("N (tokens)")
    axes[0, 0].legend()
    fig.suptitle(f"D={d}, V={v}, {sel[0].dtype}, {sel[0].machine}, {sel[0].threads} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
