"""Timing, the matmul rate, and peak memory, each the way `bench/run.py` reports it.

Times: forward+backward of one step, methods alternating within each repetition after a warm-up,
medians over repetitions. Rate: a 2048^3 GEMM in the inputs' dtype by ``torch.mm`` and by oneDNN,
timed in the same alternation; the faster gives the floor. Memory: one step in a fresh process
(`peak_growth_child`), after one at the same shape: the resident-set high-water mark minus the
resident set before it (CPU), or ``torch.cuda.max_memory_allocated`` minus the allocated bytes (CUDA).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from methods import Inputs, step

HERE = Path(__file__).resolve().parent

# Large allocations straight from mmap and back to the OS on free, so that the resident set
# tracks the bytes a method holds rather than what glibc's heap keeps for later.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call of ``fn``."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def flop_floor(n: int, d: int, v: int, keep_ratio: float, task: str) -> float:
    """Matmul flops a fused loss cannot avoid for forward+backward.

    SLM: ``(2 + 6 r) N D V`` (logits of every token, then recompute, ``d hidden`` and ``d weight``
    for the kept ones). Plain CE: ``6 N D V`` (logits, ``d hidden``, ``d weight`` of every token).
    """
    return (2 + 6 * keep_ratio) * n * d * v if task == "slm" else 6.0 * n * d * v


def _gemm_dtypes(dtype: torch.dtype) -> Iterator[tuple[torch.dtype, str]]:
    """``(dtype, "")``, and for a 16-bit ``dtype`` also ``(fp32, "_fp32")``: a CPU without bf16 units
    emulates bf16 more slowly than fp32, so a floor tries both."""
    for dt in dict.fromkeys((dtype, torch.float32)):
        yield dt, "" if dt == dtype else "_fp32"


def _onednn_linear(device: str) -> Callable[..., torch.Tensor] | None:
    """oneDNN's ``x @ w.T`` on CPU, None elsewhere."""
    return torch.ops.mkldnn._linear_pointwise if device == "cpu" and torch.backends.mkldnn.is_available() else None


class MatmulRate:
    """The machine's GEMM rate in ``dtype``: a 2048 x 2048 x 2048 product by each GEMM torch offers.

    ``torch.mm`` (MKL or oneDNN on CPU, into a preallocated output) and, on CPU, oneDNN's linear;
    for a 16-bit ``dtype`` the same in fp32 too (`_gemm_dtypes`). The floor uses the fastest, so
    that it flatters no method.
    """

    SIZE = 2048

    def __init__(self, device: str, dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator(device="cpu").manual_seed(1)
        self.flops = 2.0 * self.SIZE**3
        self.gemms: dict[str, Callable[[], object]] = {}
        linear = _onednn_linear(device)
        for dt, suffix in _gemm_dtypes(dtype):
            a, b = (torch.randn(self.SIZE, self.SIZE, generator=g).to(device, dt) for _ in range(2))
            out = torch.empty_like(a)
            self.gemms["mm" + suffix] = lambda a=a, b=b, out=out: torch.mm(a, b.T, out=out)
            if linear is not None:
                self.gemms["onednn" + suffix] = lambda a=a, b=b: linear(a, b, None, "none", [], "")

    def rates(self, device: str) -> dict[str, float]:
        """flop/s of one call of each GEMM."""
        return {name: self.flops / timed(gemm, device) for name, gemm in self.gemms.items()}


class Products:
    """The matrix products a fused step cannot avoid, each one whole-size GEMM, and nothing else: plain
    CE ``h W^T``, ``d z W`` and ``d z^T h`` over all N rows (``6 N D V`` flops); SLM ``h W^T`` over
    all rows, then the same three over the ``ceil(r N)`` kept rows (``(2 + 6 r) N D V``).

    Each product runs by every GEMM that `MatmulRate` tries (``torch.mm`` into a preallocated output
    and, on CPU, oneDNN's linear; for 16-bit inputs the same in fp32 too), timed apart; `seconds` sums
    each product's fastest. That is the floor at these very shapes, where `MatmulRate`'s 2048^3
    product may run faster than a product with an inner dimension of D. The values multiplied do not
    matter: ``d z`` is the buffer of the logits.
    """

    def __init__(self, x: Inputs, device: str) -> None:
        self.n = n = x.hidden.shape[0]
        self.kept = math.ceil(x.keep_ratio * n)
        linear = _onednn_linear(device)
        self.jobs: dict[tuple[str, str], Callable[[], object]] = {}  # (product, GEMM) -> one call
        for dt, suffix in _gemm_dtypes(x.hidden.dtype):
            h, w = x.hidden.detach().to(dt), x.weight.detach().to(dt)
            z = torch.randn(n, w.shape[0], device=h.device, dtype=dt)
            dh, dw = torch.empty_like(h), torch.empty_like(w)
            for r in dict.fromkeys((n, self.kept)):
                hr, zr = h[:r], z[:r]
                self.jobs.update({
                    (f"logits {r}", "mm" + suffix): lambda hr=hr, zr=zr, w=w: torch.mm(hr, w.T, out=zr),
                    (f"dh {r}", "mm" + suffix): lambda zr=zr, w=w, dh=dh, r=r: torch.mm(zr, w, out=dh[:r]),
                    (f"dw {r}", "mm" + suffix): lambda zr=zr, hr=hr, dw=dw: torch.mm(zr.T, hr, out=dw),
                })  # fmt: skip
                if linear is not None:
                    ht = hr.T.contiguous()  # d W^T = h^T d z: oneDNN wants its input contiguous
                    self.jobs.update({
                        (f"logits {r}", "onednn" + suffix): lambda hr=hr, w=w: linear(hr, w, None, "none", [], ""),
                        (f"dh {r}", "onednn" + suffix): lambda zr=zr, w=w: linear(zr, w.T, None, "none", [], ""),
                        (f"dw {r}", "onednn" + suffix): lambda ht=ht, zr=zr: linear(ht, zr.T, None, "none", [], ""),
                    })  # fmt: skip

    def pieces(self, task: str) -> list[str]:
        """The products of one step of ``task``."""
        r = self.n if task == "ce" else self.kept
        return [*([] if task == "ce" else [f"logits {self.n}"]), f"logits {r}", f"dh {r}", f"dw {r}"]

    def seconds(self, task: str, times: dict[tuple[str, str], list[float]]) -> float:
        """The step's products alone: each product's fastest GEMM, medians of ``times``."""
        return sum(min(median(t) for (piece, _), t in times.items() if piece == want) for want in self.pieces(task))


def time_methods(
    x: Inputs, methods: list[str], tasks: list[str], reps: int, device: str, dtype: torch.dtype = torch.float32
) -> tuple[dict[tuple[str, str], list[float]], dict[str, list[float]]]:
    """Times of every ``(method, task)``, the step's `Products` alone (method ``"products"``) and each
    GEMM's rate (flop/s) in ``dtype``, alternating per repetition."""
    gemm = MatmulRate(device, dtype)
    alone = Products(x, device)
    jobs: dict[tuple[str, str], Callable[[], None]] = {
        (m, t): (lambda m=m, t=t: step(m, x, t)) for t in tasks for m in methods
    }
    for job in [*jobs.values(), *alone.jobs.values()]:  # warm-up: compilation, first-touch of pages, library buffers
        job()
    gemm.rates(device)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in jobs}
    product_times: dict[tuple[str, str], list[float]] = {k: [] for k in alone.jobs}
    rates: dict[str, list[float]] = {name: [] for name in gemm.gemms}
    for _ in range(reps):
        for name, r in gemm.rates(device).items():
            rates[name].append(r)
        for key, job in jobs.items():
            times[key].append(timed(job, device))
        for key, product in alone.jobs.items():
            product_times[key].append(timed(product, device))
    x.zero_grad()
    for t in tasks:
        times[("products", t)] = [alone.seconds(t, product_times)]
    return times, rates


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """``n`` processes that each spin one core (``while True: pass``) for the duration: a competing load."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert match is not None, field
    return int(match.group(1))


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_peak_growth(run_step: Callable[[], None], drop_grads: Callable[[], None], device: str) -> float:
    """Peak memory growth of ``run_step()`` in MiB, in this process, gradients included.

    The step of a training loop after its first: ``run_step`` once and its gradients dropped, so
    that what the libraries keep after a first call at a shape (oneDNN's kernels and caches,
    thread arenas: ~10 MiB for every method here) is not counted; then the measured call.
    """
    run_step()
    drop_grads()
    _release_memory()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    run_step()
    return (_status_kib("VmHWM") - before) / 1024


def peak_growth_child(
    method: str, task: str, n: int, d: int, v: int, keep_ratio: float, device: str, dtype: torch.dtype = torch.float32
) -> float:
    """In this (fresh) process: `step_peak_growth` of one forward+backward of ``method``."""
    x = Inputs.make(n, d, v, keep_ratio, device, dtype=dtype)
    return step_peak_growth(lambda: step(method, x, task), x.zero_grad, device)


def peak_growth(
    method: str, task: str, n: int, d: int, v: int, keep_ratio: float, device: str, dtype: str = "fp32"
) -> float:
    """`peak_growth_child` run in a process of its own (``dtype``: run.py's ``--dtype``); NaN if the child fails."""
    cmd = [sys.executable, str(HERE / "run.py"), "--memory-child", json.dumps([method, task, n, d, v, keep_ratio])]
    cmd += ["--device", device, "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV}, check=False)
    if proc.returncode != 0:
        print(f"memory child failed for {method}/{task}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return float("nan")
    return float(proc.stdout.strip().splitlines()[-1])
