"""The one command for a short GPU window: correctness, no-sync, CUDA graphs, time and memory, in one run.

    python bench/gpu_check.py                          # writes bench/results/gpu-check-<gpu>-<versions>/
    python bench/gpu_check.py --out DIR --budget-s 420
    python bench/gpu_check.py --smoke --out /tmp/gc    # tiny shapes, CPU, Triton's interpreter (CI)

Sections, most important first (a check is named ``<section>/<what>``):

1. ``env``: versions, the device, the measured matmul rate (bf16 ``torch.mm`` on a GPU; fp32 on CPU).
2. ``compact``, ``select``: the two index kernels against a torch transcription of their contract
   (ties, +-0, +-inf, NaN of both signs, ignored rows, empty groups).
3. ``parity``, ``loss``: loss and every gradient of the triton backend against the fp64 truth, with
   the test suite's rule (``tests/cases.py``): error <= max(PyTorch's error, the reference
   backend's error) in the same dtype + ``EXTRA_TOL[dtype] * max|truth|`` is ``pass``, within
   ``WARN_FACTOR`` times that ``warn``, beyond it ``fail``; a kept set other than the truth's is
   ``fail``. Also forced vocabulary chunking, all tokens ignored, strided and expanded inputs.
4. ``nosync``, ``graph``, ``determinism``: ``torch.cuda.set_sync_debug_mode("error")`` around
   forward+backward; CUDA-graph capture replayed on two input sets, bitwise against eager; three
   runs bitwise equal.
5. ``timing``: forward+backward time (median after a warm-up) and peak memory growth of rho_fused
   and the peers (`methods.py`), SLM keep 0.6 and plain CE, bf16, logits of std 3. TFLOP/s on the
   useful work, ``(2 + 6 r) N D V`` for SLM and ``6 N D V`` for CE, and its ratio to the matmul rate.
6. ``offsets``: tensors past 2^31 elements (``V*D``, ``N*D``, ``N*V``), last rows against torch.
7. ``compile``, ``autocast``: a torch.compile'd step against eager; autocast bf16 against bf16 inputs.
8. ``sweep``: forward and backward kernel tile configurations timed at one shape (reported, not applied).
9. ``score``: scoring throughput (`score_throughput.py`) against the Hugging Face logits path.
10. ``variant``: the contract's variants (``tests/test_variants.py``'s cases) in bf16, fp16 and fp32,
    with the test suite's parity rule; run right after section 3.

Output: ``DIR/gpu_check.jsonl``, one JSON object per check (``name``, ``section``, ``status`` in
pass | warn | skip | fail | error, ``seconds``, ``figures``, and ``reason`` or ``error``), flushed as
it goes; then ``DIR/gpu_check.md``, the same as tables. Exit status 1 on any fail or error.

Time: before each section, and before each check, the estimate is compared with what is left of
``--budget-s``; what does not fit is recorded as ``skip`` with the reason, and later sections still
get their chance. A watchdog ends the run (``error``, summary written) at the budget plus
``--grace-s``. A check that errors and leaves CUDA unusable (an illegal memory access) makes the
script replace its process (``os.execv``) and continue with the next check, in the same files and on
the same budget clock, at most three times. Without CUDA, or with ``--smoke``, everything runs at
tiny shapes on CPU under ``TRITON_INTERPRET=1``, with the test suite's interpreter corrections
(`rho_fused.kernels.interpreter`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STATUSES = ("pass", "warn", "skip", "fail", "error")
WARN_FACTOR = 4.0  # parity: an error within 4x PyTorch's budget is a warn, beyond it a fail
SOFTCAP = 10.0
LOGIT_STD = 3.0  # as methods.LOGIT_STD: a trained LM head's spread
IGNORE = -100


# --------------------------------------------------------------------------------------------------
# Set-up: where the kernels run, and importing the package from a checkout that is not installed


def ensure_package() -> None:
    """Make ``rho_fused`` importable: installed, or straight from this checkout.

    ``setup.py`` maps ``kernels/`` to ``rho_fused.kernels`` (``package_dir``). Without an install (a
    GPU machine that received a copy of the tree) the repository root goes on ``sys.path`` and
    ``rho_fused.kernels`` is registered from ``kernels/`` before ``rho_fused`` is first imported.
    """
    for path in (HERE, ROOT / "tests"):  # methods.py, cases.py
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    try:
        importlib.metadata.distribution("rho-fused")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    sys.path.insert(0, str(ROOT))
    if "rho_fused.kernels" in sys.modules:
        return
    init = ROOT / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "rho_fused.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"kernels: cannot load {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["rho_fused.kernels"] = module
    spec.loader.exec_module(module)


def load_interpreter_patches() -> None:
    """Apply the corrections of Triton's interpreter the tests use (16-bit dots, bf16 rounding)."""
    from rho_fused.kernels.interpreter import correct_interpreter

    correct_interpreter()


# --------------------------------------------------------------------------------------------------
# Shapes: one set for the GPU, one for the smoke run


@dataclass(frozen=True)
class Sizes:
    """Every shape the checks use; `GPU_SIZES` on a GPU, `SMOKE_SIZES` on CPU."""

    matmul: int  # edge of the square matmul timed for the rate
    compact_n: int
    select_m: int  # rows per group in the select checks
    select_large: int
    parity_bt: tuple[int, int]  # [B, T] tokens of the parity inputs
    parity_d: int
    parity_v: int
    chunk_budget_bytes: int  # BackwardConfig.budget_bytes for the forced-chunking checks
    timing_shapes: tuple[tuple[int, int, int], ...]
    timing_reps: int
    offsets: dict[str, tuple[int, int, int]]  # name -> (N, D, V)
    offsets_rows: int  # last rows checked
    compile_bt: tuple[int, int]
    compile_dv: tuple[int, int]
    sweep_ndv: tuple[int, int, int]
    sweep_reps: int
    estimate_scale: float  # seconds of estimate per unit of a check's nominal cost


GPU_SIZES = Sizes(
    matmul=8192,
    compact_n=1 << 22,
    select_m=100_000,
    select_large=1 << 20,
    parity_bt=(8, 512),
    parity_d=1024,
    parity_v=50257,
    chunk_budget_bytes=64 * 2**20,
    timing_shapes=((8192, 4096, 128256), (16384, 2048, 128256), (8192, 2048, 256000)),
    timing_reps=3,
    # V*D, N*D and N*V each just past 2^31 = 2147483648 elements
    offsets={"vd": (512, 8192, 266240), "nd": (528384, 4096, 512), "nv": (32768, 128, 65600)},
    offsets_rows=256,
    compile_bt=(4, 512),
    compile_dv=(1024, 32000),
    sweep_ndv=(4096, 4096, 128256),
    sweep_reps=3,
    estimate_scale=1.0,
)

SMOKE_SIZES = Sizes(
    matmul=512,
    compact_n=300,
    select_m=70,
    select_large=300,
    parity_bt=(2, 13),
    parity_d=24,
    parity_v=97,
    chunk_budget_bytes=1,
    timing_shapes=((64, 32, 128), (96, 32, 160), (64, 16, 256)),
    timing_reps=2,
    offsets={"vd": (8, 24, 97), "nd": (40, 24, 33), "nv": (40, 16, 97)},
    offsets_rows=4,
    compile_bt=(2, 13),
    compile_dv=(24, 97),
    sweep_ndv=(40, 24, 97),
    sweep_reps=1,
    estimate_scale=0.05,
)


# --------------------------------------------------------------------------------------------------
# Records, the run's context, and the runner


@dataclass
class Outcome:
    """What a check found: its status, its figures, and a one-line reason where useful."""

    status: str
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


@dataclass
class Check:
    """One check: a name, a function of the context, and its time estimate in seconds on this device."""

    name: str
    run: Callable[[Context], Outcome]
    estimate_s: float


@dataclass
class Section:
    number: int
    title: str
    checks: list[Check]


@dataclass
class Context:
    """State shared by the checks: device, shapes, budget, the measured matmul rate, a small cache."""

    device: str
    smoke: bool
    sizes: Sizes
    budget_s: float
    start: float = field(default_factory=time.monotonic)
    matmul_flops: float | None = None  # flop/s of the rate check
    cache: dict[tuple, Any] = field(default_factory=dict)
    current: str = ""
    out: Path | None = None  # the results folder (checks that write a file of their own)

    def left(self) -> float:
        """Seconds of the budget still unspent."""
        return self.budget_s - (time.monotonic() - self.start)

    def cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` once per key; a new key evicts the other entries of its kind (``key[0]``)."""
        if key not in self.cache:
            for other in [k for k in self.cache if k[0] == key[0]]:
                del self.cache[other]
            free_memory(self.device)
            self.cache[key] = make()
        return self.cache[key]

    def estimate(self, nominal_s: float) -> float:
        """A check's estimate on this device from its nominal (GPU) seconds."""
        return nominal_s * self.sizes.estimate_scale


class Recorder:
    """Appends one JSON object per check to ``gpu_check.jsonl``, flushed after each, and keeps them."""

    def __init__(self, out: Path, resume: bool = False) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        path = out / "gpu_check.jsonl"
        self.records: list[dict[str, Any]] = []
        if resume and path.exists():  # a run restarted after its CUDA context was lost: keep what it found
            self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.lock = threading.Lock()
        self.file = path.open("a" if resume else "w")

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            record = _jsonable(record)
            self.records.append(record)
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        line = record.get("reason") or record.get("error", "").strip().splitlines()[-1:] or ""
        line = line if isinstance(line, str) else " ".join(line)
        print(
            f"[{record['at_s']:6.1f}s] {record['status']:5s} {record['name']}  {_brief(record)} {line}"[:300],
            flush=True,
        )


def _jsonable(x: Any) -> Any:
    """Plain JSON: non-finite floats as strings, tensors and dtypes as text, floats to 6 digits."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist()) if x.numel() <= 16 else f"tensor{tuple(x.shape)}"
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else str(x)
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    return str(x)


def _brief(record: dict[str, Any]) -> str:
    """A few figures of a record, for the progress line and the markdown table."""
    parts = []
    for k, v in record.get("figures", {}).items():
        if isinstance(v, dict):
            v = "{" + ", ".join(f"{a}: {_fmt(b)}" for a, b in v.items()) + "}"
        parts.append(f"{k}={_fmt(v)}")
    return ", ".join(parts)


def _fmt(v: Any) -> str:
    """Floats to 3 significant digits, None as "-"."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def run_check(check: Check, ctx: Context, section: int) -> dict[str, Any]:
    """Run one check; any exception becomes an ``error`` record with the traceback's tail."""
    ctx.current = check.name
    t0 = time.monotonic()
    record: dict[str, Any] = {"name": check.name, "section": section}
    try:
        outcome = check.run(ctx)
        if outcome.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {outcome.status!r}")
        record.update(status=outcome.status, figures=outcome.figures)
        if outcome.reason:
            record["reason"] = outcome.reason
    except Exception as exc:  # one failing check must not stop the others
        record.update(status="error", figures={}, error=traceback.format_exc()[-2000:])
        record["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        free_memory(ctx.device)
    record["seconds"] = round(time.monotonic() - t0, 3)
    record["at_s"] = round(time.monotonic() - ctx.start, 1)
    return record


def skipped(check: Check, ctx: Context, section: int, reason: str) -> dict[str, Any]:
    at = round(time.monotonic() - ctx.start, 1)
    return {
        "name": check.name,
        "section": section,
        "status": "skip",
        "figures": {},
        "reason": reason,
        "seconds": 0.0,
        "at_s": at,
    }


class ContextLost(Exception):
    """The CUDA context no longer works (a sticky error such as an illegal memory access): the process
    must restart to run the remaining checks."""


def cuda_healthy() -> bool:
    """Whether a tiny CUDA operation still runs and reads back."""
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:
        return False


def run_sections(
    sections: list[Section], ctx: Context, rec: Recorder, only: str | None, lose_after: str | None = None
) -> None:
    """Each section if its estimate fits what is left of the budget, each check likewise; else skips.

    Checks already recorded (a restarted run) are passed over. A check that errors and leaves CUDA
    unusable raises `ContextLost` (``lose_after``: pretend it happened after that check, for tests).
    """
    done = {r["name"] for r in rec.records}
    for sec in sections:
        todo = [c for c in sec.checks if c.name not in done]
        chosen = [c for c in todo if only is None or re.search(only, c.name)]
        for c in todo:
            if c not in chosen:
                rec.write(skipped(c, ctx, sec.number, f"not selected by --only {only!r}"))
        estimate = sum(c.estimate_s for c in chosen)
        if chosen and ctx.left() < estimate:
            reason = f"budget: {max(ctx.left(), 0):.0f} s left, section {sec.number} needs about {estimate:.0f} s"
            for c in chosen:
                rec.write(skipped(c, ctx, sec.number, reason))
            continue
        for c in chosen:
            if ctx.left() < c.estimate_s:
                reason = f"budget: {max(ctx.left(), 0):.0f} s left, this check needs about {c.estimate_s:.0f} s"
                rec.write(skipped(c, ctx, sec.number, reason))
                continue
            record = run_check(c, ctx, sec.number)
            rec.write(record)
            lost = ctx.device == "cuda" and record["status"] == "error" and not cuda_healthy()
            if lost or c.name == lose_after:
                raise ContextLost(c.name)
        ctx.cache.clear()
        free_memory(ctx.device, collect=True)


def start_watchdog(ctx: Context, rec: Recorder, hard_limit_s: float, write_summary: Callable[[], None]) -> None:
    """End the process at ``hard_limit_s`` (a check that hangs or overruns), recording why."""

    def watch() -> None:
        while time.monotonic() - ctx.start < hard_limit_s:
            time.sleep(1.0)
        rec.write(
            {
                "name": ctx.current or "watchdog",
                "section": 0,
                "status": "error",
                "figures": {},
                "reason": f"watchdog: still running at {hard_limit_s:.0f} s, process ended",
                "seconds": 0.0,
                "at_s": round(time.monotonic() - ctx.start, 1),
            }
        )
        with contextlib.suppress(Exception):
            write_summary()
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# --------------------------------------------------------------------------------------------------
# Small helpers


def free_memory(device: str, collect: bool = False) -> None:
    """Return cached GPU memory to the driver; ``collect``: run the garbage collector first (0.2 s or so,
    so only between sections and after an out-of-memory error)."""
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def peak_growth_bytes(fn: Callable[[], object], device: str) -> float | None:
    """``max_memory_allocated`` during ``fn()`` minus the allocated bytes before it (None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


@contextlib.contextmanager
def values_unchecked() -> Iterator[None]:
    """``rho_fused.validation.CHECK_VALUES = False`` inside: the input value checks read values by design."""
    from rho_fused import validation

    old = validation.CHECK_VALUES
    validation.CHECK_VALUES = False
    try:
        yield
    finally:
        validation.CHECK_VALUES = old


@contextlib.contextmanager
def attribute(obj: object, name: str, value: object) -> Iterator[None]:
    """``obj.name = value`` inside the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in fp64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def bitwise(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same shape, dtype and bits (NaN equal to itself); both None counts as equal."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


# --------------------------------------------------------------------------------------------------
# 1. Environment


def check_versions(ctx: Context) -> Outcome:
    """Versions of everything the figures depend on, and where the package was imported from."""
    import triton

    import rho_fused
    from rho_fused import kernels

    figures = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "transformers": package_version("transformers"),
        "numpy": package_version("numpy"),
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
        "rho_fused": rho_fused.__version__,
        "commit": git_commit(),
        "package_from": str(Path(rho_fused.__file__).parent),
        "kernels_from": str(Path(kernels.__file__).parent),
        "smoke": ctx.smoke,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    return Outcome("pass", figures)


def git_commit() -> str | None:
    """``HEAD`` of the checkout, with ``+dirty`` when files differ from it; None without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def check_device(ctx: Context) -> Outcome:
    """The GPU's name, streaming multiprocessors and memory (the CPU's name and cores on CPU)."""
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return Outcome(
            "pass",
            {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "sm_count": props.multi_processor_count,
                "memory_gib": props.total_memory / 2**30,
                "devices": torch.cuda.device_count(),
            },
        )
    return Outcome("pass", {"name": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()})


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return platform.processor() or platform.machine()


def check_matmul_rate(ctx: Context) -> Outcome:
    """``2 n^3`` flops of an ``n x n`` product by ``torch.mm`` over its median time: bf16 on a GPU, fp32 on CPU.

    The rate every ``x_matmul`` figure of the timing section divides by.
    """
    n = ctx.sizes.matmul
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    g = generator(ctx.device, 1)
    a = torch.randn(n, n, generator=g, device=ctx.device).to(dtype)
    b = torch.randn(n, n, generator=g, device=ctx.device).to(dtype)
    out = torch.empty_like(a)
    times = time_calls(lambda: torch.mm(a, b, out=out), ctx.device, reps=10, warmup=3)
    ctx.matmul_flops = 2.0 * n**3 / statistics.median(times)
    return Outcome(
        "pass",
        {
            "tflops": ctx.matmul_flops / 1e12,
            "n": n,
            "dtype": str(dtype).replace("torch.", ""),
            "best_tflops": 2.0 * n**3 / min(times) / 1e12,
        },
    )


def section_env(ctx: Context) -> Section:
    return Section(
        1,
        "Versions, device, matmul rate",
        [
            Check("env/versions", check_versions, ctx.estimate(3)),
            Check("env/device", check_device, ctx.estimate(1)),
            Check("env/matmul_rate", check_matmul_rate, ctx.estimate(5)),
        ],
    )


# --------------------------------------------------------------------------------------------------
# 2. compact and select against torch


def compact_masks(ctx: Context) -> dict[str, torch.Tensor]:
    """Masks around the block size: empty, one row, block - 1, block, block + 1, several blocks, large."""
    from rho_fused.kernels import compact

    block = compact.DEFAULT_CONFIG.block
    g = generator(ctx.device, 2)
    masks = {"n0": torch.zeros(0, dtype=torch.bool, device=ctx.device)}
    for n in (1, block - 1, block, block + 1, 3 * block + 7):
        masks[f"random_{n}"] = torch.rand(n, generator=g, device=ctx.device) < 0.5
    n = ctx.sizes.compact_n
    masks["all_false"] = torch.zeros(n, dtype=torch.bool, device=ctx.device)
    masks["all_true"] = torch.ones(n, dtype=torch.bool, device=ctx.device)
    masks["alternate"] = torch.arange(n, device=ctx.device) % 2 == 1
    masks["sparse"] = torch.rand(n, generator=g, device=ctx.device) < 0.01
    masks["dense"] = torch.rand(n, generator=g, device=ctx.device) < 0.9
    return masks


def check_compact(ctx: Context) -> Outcome:
    """``idx[:count]`` equals ``mask.nonzero()`` and ``count`` equals ``mask.sum()`` for every mask."""
    from rho_fused.kernels.compact import compact_mask

    wrong = []
    masks = compact_masks(ctx)
    for name, mask in masks.items():
        idx, count = compact_mask(mask)
        want = mask.nonzero().squeeze(1)
        got_count = int(count.item())
        if got_count != want.numel() or not torch.equal(idx[:got_count].long(), want):
            wrong.append(name)
    figures = {"masks": len(masks), "largest_n": ctx.sizes.compact_n, "wrong": wrong}
    return Outcome("fail" if wrong else "pass", figures, f"wrong for {wrong}" if wrong else None)


def select_oracle(
    excess: torch.Tensor, targets: torch.Tensor, groups: int, keep: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The select kernel's contract in torch: ``(kept, threshold, n_keep, n_valid)``.

    Per group of ``M`` rows: ``n_keep = max(1, ceil(p * n_valid / q))`` (0 without a valid row) of
    the valid rows, the largest excess first, every NaN above ``+inf`` (all NaNs equal), ``-0 == +0``,
    ties to the lower index; ``threshold`` is the smallest kept excess, ``+inf`` when none is kept.
    Three stable sorts: by value, then NaN first, then valid first.
    """
    p, q = keep
    m = excess.numel() // groups
    x = excess.view(groups, m).double()
    valid = targets.view(groups, m) != IGNORE
    nan = torch.isnan(x)
    order = torch.sort(torch.where(nan, 0.0, x + 0.0), dim=1, descending=True, stable=True).indices
    for key in (nan, valid):
        k = key.gather(1, order).to(torch.int8)
        order = order.gather(1, torch.sort(k, dim=1, descending=True, stable=True).indices)
    n_valid = valid.sum(1)
    n_keep = torch.where(n_valid > 0, ((n_valid * p + q - 1) // q).clamp(min=1), 0)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(m, device=x.device).expand(groups, m).contiguous())
    kept = rank < n_keep[:, None]
    last = x.gather(1, order).gather(1, (n_keep - 1).clamp(min=0)[:, None]).squeeze(1)
    threshold = torch.where(n_keep > 0, last, math.inf).float()
    return kept.view(-1), threshold, n_keep, n_valid


def special_values(device: str) -> torch.Tensor:
    """fp32 values the select keys must order: +-0, +-inf, NaN of both signs and a signalling one,
    +-denormals, +-the largest float, and ordinary values."""
    bits = torch.tensor([0x7FC00000, -4194304, 0x7F800001], dtype=torch.int32)  # NaN, -NaN (0xFFC00000), sNaN
    nans = bits.view(torch.float32)
    ordinary = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0, 0.5, 2.0])
    return torch.cat([nans, ordinary]).to(device)


def select_inputs(ctx: Context, kind: str, groups: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(excess fp32 [G * M], targets int64 [G * M])`` with 10% of rows ignored.

    ``ties``: values in {-1, 0, 1, 2} with zeros of both signs; ``specials``: drawn from
    `special_values`; ``normal``: N(0, 1); ``empty``: normal, with groups 1 and 4 wholly ignored
    and group 5 holding a single valid row.
    """
    g = generator(ctx.device, seed)
    n = groups * m
    if kind == "ties":
        x = torch.randint(-1, 3, (n,), generator=g, device=ctx.device).float()
        x = torch.where((x == 0) & (torch.rand(n, generator=g, device=ctx.device) < 0.5), -0.0, x)
    elif kind == "specials":
        vals = special_values(ctx.device)
        x = vals[torch.randint(0, vals.numel(), (n,), generator=g, device=ctx.device)]
    else:
        x = torch.randn(n, generator=g, device=ctx.device)
    targets = torch.randint(0, 1000, (n,), generator=g, device=ctx.device)
    targets[torch.rand(n, generator=g, device=ctx.device) < 0.1] = IGNORE
    if kind == "empty":
        t = targets.view(groups, m)
        t[1] = IGNORE
        t[4] = IGNORE
        t[5] = IGNORE
        t[5, m // 2] = 7
    return x.contiguous(), targets


def compare_select(ctx: Context, excess: torch.Tensor, targets: torch.Tensor, groups: int, ratio: float) -> list[str]:
    """What differs between the select kernel and `select_oracle` (empty when they agree)."""
    from rho_fused.kernels.select import radix_top_k

    from rho_fused.problem import keep_fraction

    keep = keep_fraction(ratio)
    kept, threshold, n_keep, n_valid = radix_top_k(excess, targets, groups, IGNORE, keep)
    want = select_oracle(excess, targets, groups, keep)
    wrong = []
    if not torch.equal(kept, want[0]):
        wrong.append(f"kept ({int((kept != want[0]).sum())} rows)")
    same_nan = torch.equal(torch.isnan(threshold), torch.isnan(want[1]))
    if not same_nan or not torch.equal(threshold[~torch.isnan(threshold)], want[1][~torch.isnan(want[1])]):
        wrong.append("threshold")
    if not torch.equal(n_keep.long(), want[2]) or not torch.equal(n_valid.long(), want[3]):
        wrong.append("counts")
    return wrong


SELECT_CASES = {
    # name: (kind, groups, keep ratios)
    "ties": ("ties", 4, (0.6, 0.3, 1.0)),
    "specials": ("specials", 3, (0.3, 0.6, 0.97)),
    "empty_groups": ("empty", 6, (0.6, 0.01)),
}


def check_select(name: str) -> Callable[[Context], Outcome]:
    """Select over `SELECT_CASES[name]` at every keep ratio, against `select_oracle`."""

    def run(ctx: Context) -> Outcome:
        kind, groups, ratios = SELECT_CASES[name]
        excess, targets = select_inputs(ctx, kind, groups, ctx.sizes.select_m, seed=len(name))
        wrong = {r: w for r in ratios if (w := compare_select(ctx, excess, targets, groups, r))}
        figures = {"groups": groups, "rows_per_group": ctx.sizes.select_m, "ratios": list(ratios), "wrong": wrong}
        return Outcome("fail" if wrong else "pass", figures, f"differs from torch: {wrong}" if wrong else None)

    return run


def check_select_ratios(ctx: Context) -> Outcome:
    """Exact keep counts: groups of 10 valid rows at ratios whose products are integers in decimal
    (0.7 * 10 keeps 7, not 8), the smallest ratio (keeps 1) and 1.0 (keeps all)."""
    g = generator(ctx.device, 5)
    excess = torch.randn(40, generator=g, device=ctx.device)
    targets = torch.zeros(40, dtype=torch.int64, device=ctx.device)
    wrong = {}
    for ratio in (0.7, 0.6, 0.3, 1e-6, 0.999999, 1.0):
        if w := compare_select(ctx, excess, targets, 4, ratio):
            wrong[ratio] = w
    return Outcome("fail" if wrong else "pass", {"wrong": wrong}, f"differs from torch: {wrong}" if wrong else None)


def check_select_large(ctx: Context) -> Outcome:
    """One large group (batch scope) and 64 groups (sequence scope) of normal values, keep 0.6."""
    n = ctx.sizes.select_large
    wrong = {}
    for groups in (1, 64 if not ctx.smoke else 4):
        excess, targets = select_inputs(ctx, "normal", groups, n // groups, seed=groups)
        if w := compare_select(ctx, excess, targets, groups, 0.6):
            wrong[groups] = w
    return Outcome("fail" if wrong else "pass", {"rows": n, "wrong": wrong}, f"differs: {wrong}" if wrong else None)


def section_index_kernels(ctx: Context) -> Section:
    return Section(
        2,
        "compact and select against torch",
        [
            Check("compact/masks", check_compact, ctx.estimate(5)),
            *[Check(f"select/{name}", check_select(name), ctx.estimate(3)) for name in SELECT_CASES],
            Check("select/keep_ratios", check_select_ratios, ctx.estimate(2)),
            Check("select/large", check_select_large, ctx.estimate(4)),
        ],
    )


# --------------------------------------------------------------------------------------------------
# 3. Loss and gradients against the fp64 truth

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = {"plain": (False, None), "bias_softcap": (True, SOFTCAP)}  # name: (bias, softcap)
REDUCTIONS = ("mean", "sum", "none")
SCOPES = ("batch", "sequence")
GRAD_NAMES = ("loss", "d_hidden", "d_weight", "d_bias")


def representable(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bf16, with ``|x| < 2^-14`` (below fp16's normal range) set to 0.

    bf16, fp16 and fp32 then all hold these values exactly, so the fp64 truth of the inputs is the
    same in every dtype and is computed once per configuration.
    """
    x = x.bfloat16().float()
    return torch.where(x.abs() < 2**-14, 0.0, x)


def parity_case(ctx: Context, variant: str, seed: int = 0) -> Any:
    """A `cases.Case` of ``[B, T]`` tokens, 10% ignored, logits of std `LOGIT_STD`, fp32 leaves.

    ``ref_loss = ce_truth - e`` with ``e`` a permutation of multiples of 0.5 (as ``cases.make_case``
    with ``ref="spaced"``): the excess of valid tokens is well separated, so rounding in any dtype
    cannot change the kept set.
    """
    from cases import Case

    import rho_fused

    has_bias, softcap = VARIANTS[variant]
    (b, t), d, v = ctx.sizes.parity_bt, ctx.sizes.parity_d, ctx.sizes.parity_v
    g = generator(ctx.device, seed)
    dev = ctx.device
    hidden = representable(torch.randn(b, t, d, generator=g, device=dev))
    weight = representable(torch.randn(v, d, generator=g, device=dev) * (LOGIT_STD / math.sqrt(d)))
    bias = representable(torch.randn(v, generator=g, device=dev)) if has_bias else None
    targets = torch.randint(0, v, (b, t), generator=g, device=dev)
    targets[torch.rand(b, t, generator=g, device=dev) < 0.1] = IGNORE
    upstream = torch.randn(b, t, generator=g, device=dev)
    ce = rho_fused.token_losses(
        hidden.double(),
        weight.double(),
        targets,
        bias=None if bias is None else bias.double(),
        softcap=softcap,
        backend="reference",
    )
    spacing = torch.randperm(b * t, generator=g, device=dev).reshape(b, t).double() * 0.5
    return Case(hidden, weight, bias, targets, (ce - spacing).float(), upstream).to(torch.float32)


def parity_options(variant: str, scope: str, reduction: str) -> dict[str, Any]:
    return {"keep_ratio": 0.6, "reduction": reduction, "scope": scope, "softcap": VARIANTS[variant][1]}


def judge_parity(ours: tuple, ref: tuple, pt: tuple, truth: tuple, dtype: torch.dtype) -> Outcome:
    """The test suite's rule (``tests/cases.py``), graded.

    For the loss and each gradient: ``budget = max(err(PyTorch), err(reference)) + EXTRA_TOL[dtype] *
    max(max|truth|, 1e-3)`` with ``err(x) = max|x - truth|``; ``ratio = err(triton) / budget``.
    pass: every ratio <= 1; warn: every ratio <= `WARN_FACTOR`; else fail. A kept set or count other
    than the truth's, or a non-finite value, is a fail.
    """
    from cases import EXTRA_TOL

    (loss, grads, stats), (ref_l, ref_g, _), (pt_l, pt_g), (t_l, t_g, t_stats) = ours, ref, pt, truth
    if not torch.equal(stats.kept, t_stats.kept):
        n = int((stats.kept != t_stats.kept).sum())
        return Outcome("fail", {"kept_differs": n}, f"kept set differs from the fp64 truth's in {n} tokens")
    if not (torch.equal(stats.n_kept, t_stats.n_kept) and torch.equal(stats.n_valid, t_stats.n_valid)):
        return Outcome("fail", {}, "kept or valid counts differ from the fp64 truth's")
    ratios: dict[str, float] = {}
    for name, o, r, p, t in zip(GRAD_NAMES, [loss, *grads], [ref_l, *ref_g], [pt_l, *pt_g], [t_l, *t_g], strict=True):
        if t is None:
            if o is not None and o.any():
                return Outcome("fail", {}, f"{name}: nonzero where the truth has none")
            continue
        if o.shape != t.shape or not torch.isfinite(o).all():
            return Outcome("fail", {}, f"{name}: shape {tuple(o.shape)} or non-finite values")
        scale = t.abs().max().item() if t.numel() else 0.0
        budget = max(max_abs(p, t), max_abs(r, t)) + EXTRA_TOL[dtype] * max(scale, 1e-3)
        ratios[name] = max_abs(o, t) / budget
    worst = max(ratios.values())
    status = "pass" if worst <= 1 else "warn" if worst <= WARN_FACTOR else "fail"
    reason = None if status == "pass" else f"error {worst:.2f}x PyTorch's budget ({max(ratios, key=ratios.get)})"
    return Outcome(status, {"ratio": worst, "ratios": ratios, "kept": int(stats.n_kept.sum())}, reason)


def parity_truth(ctx: Context, variant: str, scope: str, reduction: str) -> tuple:
    """The reference backend in fp64 on the case's values: ``(loss, grads, stats)``, cached across dtypes."""
    import cases

    case = ctx.cached(("case", variant), lambda: parity_case(ctx, variant))
    opts = parity_options(variant, scope, reduction)
    return ctx.cached(
        ("truth", variant, scope, reduction), lambda: cases.run(case.to(torch.float64), "reference", **opts)
    )


def run_parity(ctx: Context, variant: str, scope: str, reduction: str, dtype: torch.dtype) -> Outcome:
    """triton, reference and naive PyTorch in ``dtype`` against the fp64 truth, judged by `judge_parity`."""
    import cases

    truth = parity_truth(ctx, variant, scope, reduction)
    low = ctx.cache[("case", variant)].to(dtype)
    opts = parity_options(variant, scope, reduction)
    ours = cases.run(low, "triton", **opts)
    ref = cases.run(low, "reference", **opts)
    pt = cases.naive_pytorch(low, truth[2].kept, **opts)
    return judge_parity(ours, ref, pt, truth, dtype)


def check_parity(variant: str, scope: str, reduction: str, dtype: torch.dtype) -> Callable[[Context], Outcome]:
    return lambda ctx: run_parity(ctx, variant, scope, reduction, dtype)


def check_chunked_vocab(dtype: torch.dtype) -> Callable[[Context], Outcome]:
    """Parity with the backward's vocabulary walked in several chunks (``budget_bytes`` small)."""

    def run(ctx: Context) -> Outcome:
        from rho_fused.kernels import backward
        from rho_fused.kernels.plan import backward_plan

        from rho_fused.problem import keep_count_int

        default = backward.default_config
        small = replace(default(dtype), budget_bytes=ctx.sizes.chunk_budget_bytes)
        (b, t), d, v = ctx.sizes.parity_bt, ctx.sizes.parity_d, ctx.sizes.parity_v
        chunks = backward_plan(b * keep_count_int(t, 0.6), v, d, dtype, small).chunks
        with attribute(backward, "default_config", lambda dt: replace(default(dt), budget_bytes=small.budget_bytes)):
            outcome = run_parity(ctx, "bias_softcap", "sequence", "none", dtype)
        outcome.figures["chunks"] = chunks
        if chunks < 2:
            return Outcome(
                "fail", outcome.figures, f"budget {small.budget_bytes} B gives one chunk: not a chunking test"
            )
        return outcome

    return run


def check_all_ignored(dtype: torch.dtype) -> Callable[[Context], Outcome]:
    """No valid token: loss 0 (every element for ``none``), every gradient 0, no NaN, 0 kept."""

    def run(ctx: Context) -> Outcome:
        import cases

        case = ctx.cached(("case", "bias_softcap"), lambda: parity_case(ctx, "bias_softcap"))
        low = replace(case, targets=torch.full_like(case.targets, IGNORE)).to(dtype)
        bad = []
        for scope in SCOPES:
            for reduction in REDUCTIONS:
                loss, grads, stats = cases.run(low, "triton", **parity_options("bias_softcap", scope, reduction))
                values = [loss, *[x for x in grads if x is not None]]
                if any(x.any() or not torch.isfinite(x).all() for x in values) or stats.n_kept.any():
                    bad.append(f"{scope}/{reduction}")
        return Outcome("fail" if bad else "pass", {"bad": bad}, f"nonzero or NaN in {bad}" if bad else None)

    return run


def strided_copy(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of ``x`` in a non-contiguous layout: every other row of a buffer twice as long in
    dimension 1 (dimension 0 for a vector) for ``"slice"``, the transposed storage of a matrix for
    ``"transpose"``."""
    if kind == "transpose":
        return x.detach().T.contiguous().T
    dim = 1 if x.dim() >= 2 else 0
    shape = list(x.shape)
    shape[dim] *= 2
    base = torch.zeros(shape, dtype=x.dtype, device=x.device)
    index: list[slice] = [slice(None)] * x.dim()
    index[dim] = slice(None, None, 2)
    view = base[tuple(index)]
    view.copy_(x.detach())
    return view


def strided_case(case: Any) -> Any:
    """``case`` with every input a non-contiguous view of the same values; leaves stay leaves."""

    def leaf(t: torch.Tensor | None, kind: str) -> torch.Tensor | None:
        return None if t is None else strided_copy(t, kind).detach().requires_grad_(True)

    return replace(
        case,
        hidden=leaf(case.hidden, "slice"),
        weight=leaf(case.weight, "transpose"),
        bias=leaf(case.bias, "slice"),
        targets=strided_copy(case.targets, "slice"),
        ref_loss=strided_copy(case.ref_loss, "slice"),
    )


def compare_runs(a: tuple, b: tuple) -> tuple[bool, float, bool]:
    """``(bitwise, max relative difference, kept equal)`` of two ``cases.run`` results."""
    pairs = [(a[0], b[0]), *zip(a[1], b[1], strict=True)]
    same = all(bitwise(x, y) for x, y in pairs)
    rel = max(
        (max_abs(x, y) / max(y.abs().max().item(), 1e-30) for x, y in pairs if x is not None and y is not None),
        default=0.0,
    )
    return same, rel, torch.equal(a[2].kept, b[2].kept)


def check_strided(dtype: torch.dtype) -> Callable[[Context], Outcome]:
    """Strided views of every input (a slice, a transposed weight) and an expanded scalar ``ref_loss``,
    against the same values contiguous: bitwise equal is a pass, within 1e-6 a warn, else a fail."""

    def run(ctx: Context) -> Outcome:
        import cases

        case = ctx.cached(("case", "bias_softcap"), lambda: parity_case(ctx, "bias_softcap")).to(dtype)
        opts = parity_options("bias_softcap", "sequence", "none")
        results = {
            "views": compare_runs(cases.run(strided_case(case), "triton", **opts), cases.run(case, "triton", **opts))
        }
        expanded = torch.full((), 1.5, device=ctx.device).expand(case.targets.shape)
        opts = parity_options("bias_softcap", "batch", "mean")
        results["expanded_ref"] = compare_runs(
            cases.run(replace(case, ref_loss=expanded), "triton", **opts),
            cases.run(replace(case, ref_loss=expanded.contiguous()), "triton", **opts),
        )
        figures = {k: {"bitwise": s, "rel": r, "kept_equal": k_eq} for k, (s, r, k_eq) in results.items()}
        if all(s for s, _, _ in results.values()):
            return Outcome("pass", figures)
        ok = all(k_eq and r <= 1e-6 for _, r, k_eq in results.values())
        return Outcome("warn" if ok else "fail", figures, "strided inputs give other results than contiguous ones")

    return run


def section_parity(ctx: Context) -> Section:
    checks = []
    scale = 1.5  # nominal seconds per parity check on a GPU (kernel compilation included, on average)
    for variant in VARIANTS:
        for scope in SCOPES:
            for reduction in REDUCTIONS:
                for dname, dtype in DTYPES.items():
                    name = f"parity/{variant}/{scope}/{reduction}/{dname}"
                    checks.append(Check(name, check_parity(variant, scope, reduction, dtype), ctx.estimate(scale)))
    for dname, dtype in DTYPES.items():
        checks.append(Check(f"parity/chunked_vocab/{dname}", check_chunked_vocab(dtype), ctx.estimate(scale)))
    for dname, dtype in DTYPES.items():
        checks.append(Check(f"loss/all_ignored/{dname}", check_all_ignored(dtype), ctx.estimate(2)))
    for dname in ("bf16", "fp32"):
        checks.append(Check(f"loss/strided/{dname}", check_strided(DTYPES[dname]), ctx.estimate(2)))
    return Section(3, "Loss and gradients against the fp64 truth", checks)


# --------------------------------------------------------------------------------------------------
# 10. The contract's variants (threshold, sample, soft, token weights, several references, z-loss,
# label smoothing, lse), run after section 3

VARIANT_DTYPES = ("bf16", "fp16", "fp32")
SMOKE_VARIANTS = ("mixed", "mixed_soft", "return_lse")  # each of the others is in one of these


def check_variant(name: str, dtype: torch.dtype) -> Callable[[Context], Outcome]:
    """Variant ``name`` of ``tests/test_variants.py`` on the triton backend against the fp64 truth, with
    the test suite's rule (`cases.assert_parity`): the kept set and weights, loss, ``lse`` and every
    gradient no further from the truth than PyTorch in ``dtype`` plus a small tolerance, else a fail."""

    def run(ctx: Context) -> Outcome:
        import cases
        import test_variants

        shape, dim, vocab = ((5, 13), 24, 97) if ctx.smoke else ((4, 253), 256, 4099)
        case, options = test_variants.variant_case(name, shape=shape, dim=dim, vocab=vocab, seed=17)
        try:
            stats = cases.assert_parity(case, "triton", dtype, **options)
        except AssertionError as exc:
            return Outcome("fail", {}, str(exc).splitlines()[0][:300])
        return Outcome("pass", {"kept": int(stats.n_kept.sum()), "valid": int(stats.n_valid.sum())})

    return run


def section_variants(ctx: Context) -> Section:
    names = SMOKE_VARIANTS if ctx.smoke else tuple(__import__("test_variants").VARIANTS)
    dtypes = ("fp32",) if ctx.smoke else VARIANT_DTYPES
    checks = [
        Check(f"variant/{name}/{d}", check_variant(name, DTYPES[d]), ctx.estimate(1.5))
        for name in names
        for d in dtypes
    ]
    return Section(10, "The contract's variants against the fp64 truth", checks)


# --------------------------------------------------------------------------------------------------
# 4. No host synchronisation, CUDA graphs, determinism


def bf16_case(ctx: Context, seed: int = 0) -> Any:
    """The bias + softcap parity inputs in bf16 (cached for seed 0)."""
    if seed == 0:
        return ctx.cached(("case", "bias_softcap"), lambda: parity_case(ctx, "bias_softcap")).to(torch.bfloat16)
    return parity_case(ctx, "bias_softcap", seed=seed).to(torch.bfloat16)


def check_nosync(scope: str) -> Callable[[Context], Outcome]:
    """Forward and backward of the triton backend under ``torch.cuda.set_sync_debug_mode("error")``,
    reductions mean and none, after a warm-up outside it (compilation may synchronise)."""

    def run(ctx: Context) -> Outcome:
        import cases

        if ctx.device != "cuda":
            return Outcome("skip", {}, "CPU: no CUDA synchronisation to detect")
        case = bf16_case(ctx)
        synced = {}
        with values_unchecked():
            for reduction in ("mean", "none"):
                opts = parity_options("bias_softcap", scope, reduction)
                cases.run(case, "triton", **opts)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    cases.run(case, "triton", **opts)
                except RuntimeError as exc:
                    if "synchroniz" not in str(exc):
                        raise
                    synced[reduction] = str(exc).splitlines()[0][:200]
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        return Outcome(
            "fail" if synced else "pass",
            {"synchronised": synced},
            f"host synchronisation: {synced}" if synced else None,
        )

    return run


class StaticInputs:
    """Fixed tensors a CUDA graph reads: the leaves of one `cases.Case`, refilled in place by `load`."""

    def __init__(self, case: Any) -> None:
        self.case = replace(
            case,
            hidden=case.hidden.detach().clone().requires_grad_(True),
            weight=case.weight.detach().clone().requires_grad_(True),
            bias=case.bias.detach().clone().requires_grad_(True),
            targets=case.targets.clone(),
            ref_loss=case.ref_loss.clone(),
            upstream=case.upstream.clone(),
        )

    def load(self, case: Any) -> None:
        with torch.no_grad():
            for name in ("hidden", "weight", "bias", "targets", "ref_loss", "upstream"):
                getattr(self.case, name).copy_(getattr(case, name))

    def step(self, opts: dict[str, Any]) -> list[torch.Tensor]:
        """``[loss, kept, d hidden, d weight, d bias]`` of one forward and backward."""
        import rho_fused

        c = self.case
        loss, stats = rho_fused.fused_selective_loss(
            c.hidden, c.weight, c.targets, c.ref_loss, bias=c.bias, backend="triton", return_stats=True, **opts
        )
        upstream = c.upstream if opts["reduction"] == "none" else None
        grads = torch.autograd.grad(loss, [c.hidden, c.weight, c.bias], grad_outputs=upstream)
        return [loss.detach(), stats.kept, *grads]


def replay_matches(static: StaticInputs, cases_ab: tuple[Any, Any], opts: dict[str, Any]) -> dict[str, bool]:
    """Capture `StaticInputs.step` in a CUDA graph and replay it on two input sets, each compared bitwise
    with an eager run on the same inputs."""
    eager = []
    for case in cases_ab:
        static.load(case)
        eager.append([x.clone() for x in static.step(opts)])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up on a side stream, as torch.cuda.graph asks
            static.step(opts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = static.step(opts)
    same = {}
    for label, case, want in zip(("a", "b"), cases_ab, eager, strict=True):
        static.load(case)
        graph.replay()
        torch.cuda.synchronize()
        same[label] = all(bitwise(x, y) for x, y in zip(out, want, strict=True))
    return same


def check_graph(scope: str) -> Callable[[Context], Outcome]:
    """CUDA-graph capture of forward and backward, replayed on two input sets (other values, other
    ignored tokens), bitwise against eager; reductions mean and none."""

    def run(ctx: Context) -> Outcome:
        if ctx.device != "cuda":
            return Outcome("skip", {}, "CPU: no CUDA graphs")
        cases_ab = (bf16_case(ctx), bf16_case(ctx, seed=1))
        results = {}
        for reduction in ("mean", "none"):
            results[reduction] = replay_matches(
                StaticInputs(cases_ab[0]), cases_ab, parity_options("bias_softcap", scope, reduction)
            )
        ok = all(all(r.values()) for r in results.values())
        return Outcome("pass" if ok else "fail", {"bitwise": results}, None if ok else "replay differs from eager")

    return run


def check_determinism(dtype: torch.dtype) -> Callable[[Context], Outcome]:
    """Three forward+backward runs (bias, softcap, sequence scope, per-token upstream gradient) bitwise equal."""

    def run(ctx: Context) -> Outcome:
        import cases

        case = ctx.cached(("case", "bias_softcap"), lambda: parity_case(ctx, "bias_softcap")).to(dtype)
        opts = parity_options("bias_softcap", "sequence", "none")
        runs = [cases.run(case, "triton", **opts) for _ in range(3)]
        same = [compare_runs(r, runs[0])[0] for r in runs[1:]]
        return Outcome(
            "pass" if all(same) else "fail",
            {"runs": 3, "bitwise": same},
            None if all(same) else "results differ between runs",
        )

    return run


def section_sync(ctx: Context) -> Section:
    checks = [Check(f"nosync/{scope}", check_nosync(scope), ctx.estimate(3)) for scope in SCOPES]
    checks += [Check(f"determinism/{d}", check_determinism(t), ctx.estimate(2)) for d, t in DTYPES.items()]
    checks += [Check(f"graph/{scope}", check_graph(scope), ctx.estimate(5)) for scope in SCOPES]
    return Section(4, "No host synchronisation, CUDA graphs, determinism", checks)


# --------------------------------------------------------------------------------------------------
# 5. Time and peak memory against the peers

TIMING_METHODS = ("naive", "rho_fused", "torch_lce", "liger", "cce", "cce_exact")
TIMING_TASKS = ("slm", "ce")
KEEP = 0.6
PEER_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "cce_exact": "cut_cross_entropy"}


def method_missing(method: str, device: str) -> str | None:
    """Why ``method`` cannot run here (None when it can)."""
    import torch.nn.functional as F

    if method == "torch_lce" and not (
        hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    ):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    module = PEER_MODULES.get(method)
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    if device != "cuda":
        return f"{method} is compared on CUDA only"
    return None


def useful_flops(n: int, d: int, v: int, task: str) -> float:
    """Matmul work a fused loss cannot avoid: ``(2 + 6 r) N D V`` for SLM at keep ratio r, ``6 N D V`` for CE."""
    return (2 + 6 * KEEP) * n * d * v if task == "slm" else 6.0 * n * d * v


def timing_inputs(ctx: Context, shape: tuple[int, int, int]) -> Any:
    """`methods.Inputs` at ``shape``, bf16 on a GPU (fp32 on CPU), cached for the checks of one shape."""
    from methods import Inputs

    n, d, v = shape
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    return ctx.cached(("inputs", shape), lambda: Inputs.make(n, d, v, KEEP, ctx.device, dtype=dtype))


def measure_method(ctx: Context, method: str, task: str, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Median forward+backward time after a warm-up, the peak memory growth of one more step (gradients
    included), and the loss value."""
    from methods import METHODS

    x = timing_inputs(ctx, shape)
    last: dict[str, torch.Tensor] = {}

    def step() -> None:
        x.zero_grad()
        loss = METHODS[method](x, task)
        loss.backward()
        last["loss"] = loss.detach()

    times = time_calls(step, ctx.device, ctx.sizes.timing_reps, warmup=1)
    x.zero_grad()  # the step's gradients count in its growth, not in the memory before it
    peak = peak_growth_bytes(step, ctx.device)
    x.zero_grad()
    n, d, v = shape
    flops = useful_flops(n, d, v, task) / statistics.median(times)
    return {
        "ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "tflops": flops / 1e12,
        "x_matmul": flops / ctx.matmul_flops if ctx.matmul_flops else None,
        "peak_gib": None if peak is None else peak / 2**30,
        "grads_gib": (n * d + v * d) * x.hidden.element_size() / 2**30,
        "loss": float(last["loss"]),
    }


def check_timing(task: str, shape: tuple[int, int, int], method: str) -> Callable[[Context], Outcome]:
    """Time, TFLOP/s on the useful work, its ratio to the matmul rate, and peak memory of one method.

    Out of memory: a fail for rho_fused, a warn for a peer; any other error of a peer is a warn.
    The loss is compared with naive PyTorch's on the same inputs (a warn beyond 2% apart).
    """

    def run(ctx: Context) -> Outcome:
        if reason := method_missing(method, ctx.device):
            return Outcome("skip", {}, reason)
        base = {"task": task, "shape": "x".join(map(str, shape)), "method": method}
        if method == "rho_fused":
            base["backend"] = "triton" if ctx.device == "cuda" else "chunked"
        try:
            figures = {**base, **measure_method(ctx, method, task, shape)}
        except torch.OutOfMemoryError:
            free_memory(ctx.device, collect=True)
            return Outcome("fail" if method == "rho_fused" else "warn", {**base, "oom": True}, "out of memory")
        except Exception as exc:
            if method == "rho_fused":
                raise
            return Outcome(
                "warn",
                {**base, "peer_error": traceback.format_exc()[-800:]},
                f"peer raised {type(exc).__name__}: {str(exc)[:150]}",
            )
        losses = ctx.cache.setdefault(("losses",), {})
        losses[(task, shape, method)] = figures["loss"]
        naive = losses.get((task, shape, "naive"))
        if naive is not None and method != "naive":
            figures["loss_vs_naive"] = abs(figures["loss"] - naive) / max(abs(naive), 1e-30)
            if figures["loss_vs_naive"] > 0.02:
                return Outcome("warn", figures, f"loss {figures['loss']:.4g} differs from naive's {naive:.4g}")
        return Outcome("pass", figures)

    return run


def section_timing(ctx: Context) -> Section:
    checks = []
    for shape in ctx.sizes.timing_shapes:
        for task in TIMING_TASKS:
            nominal = 2.0 + 6 * useful_flops(*shape, task) / 3e14  # five steps at ~60% of a 500 TFLOP/s rate
            for method in TIMING_METHODS:
                name = f"timing/{task}/{'x'.join(map(str, shape))}/{method}"
                checks.append(Check(name, check_timing(task, shape, method), ctx.estimate(nominal)))
    return Section(5, "Time and peak memory against the peers", checks)


# --------------------------------------------------------------------------------------------------
# 6. Offsets past 2^31 elements

OFFSET_CASES = {
    "vd": "V*D > 2^31: ce of the last rows, d weight of the last vocabulary rows",
    "nd": "N*D > 2^31: ce and d hidden of the last rows",
    "nv": "N*V > 2^31: ce and d hidden of the last rows",
}


def torch_logits(h: torch.Tensor, w: torch.Tensor, cols: int = 32768) -> torch.Tensor:
    """``h @ w.T`` in fp32 from fp32 copies, ``cols`` vocabulary rows at a time (bounded memory)."""
    return torch.cat([h.float() @ w[i : i + cols].float().T for i in range(0, w.shape[0], cols)], dim=1)


def offsets_inputs(ctx: Context, n: int, d: int, v: int) -> tuple[torch.Tensor, ...]:
    """bf16 ``hidden [N, D]`` and ``weight [V, D]`` (logits of std `LOGIT_STD`), targets whose last rows
    point at the last vocabulary entries, and a random reference loss."""
    g = generator(ctx.device, 7)
    dev = ctx.device
    hidden = torch.randn(n, d, generator=g, device=dev).bfloat16().requires_grad_(True)
    weight = torch.empty(v, d, dtype=torch.bfloat16, device=dev)
    for i in range(0, v, 32768):  # in slices: no fp32 copy of a > 2^31-element weight
        rows = min(32768, v - i)
        weight[i : i + rows] = torch.randn(rows, d, generator=g, device=dev) * (LOGIT_STD / math.sqrt(d))
    targets = torch.randint(0, v, (n,), generator=g, device=dev)
    k = min(n, v)
    targets[-k:] = torch.arange(v - k, v, device=dev)
    ref_loss = torch.rand(n, generator=g, device=dev) * 10
    return hidden, weight.requires_grad_(True), targets, ref_loss


def offsets_truth(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor, rows: int, case: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch, fp32, on the rows checked only: ``(ce of the last rows, the gradient checked)``.

    With ``reduction="sum"`` the gradient of kept row i is ``p_i - onehot(t_i)`` (``p`` the softmax),
    so ``d hidden_i = kept_i (p_i - onehot_i) @ W`` and ``d W[v] = sum_i kept_i (p_iv - onehot_iv) h_i``.
    """
    v = weight.shape[0]
    if case == "vd":  # the last vocabulary rows' gradient sums over every row (N is small here)
        z = torch_logits(hidden.detach(), weight.detach())
        lse = torch.logsumexp(z, 1, keepdim=True)
        ce = lse.squeeze(1) - z.gather(1, targets[:, None]).squeeze(1)
        dz = torch.exp(z[:, -rows:] - lse) - (targets[:, None] == torch.arange(v - rows, v, device=z.device)).float()
        return ce[-rows:], (dz * kept[:, None]).T @ hidden.detach().float()
    h = hidden.detach()[-rows:]
    z = torch_logits(h, weight.detach())
    t = targets[-rows:]
    ce = torch.logsumexp(z, 1) - z.gather(1, t[:, None]).squeeze(1)
    dz = torch.softmax(z, 1) - torch.nn.functional.one_hot(t, v).float()
    dh = (dz * kept[-rows:, None]) @ weight.detach().float()
    return ce, dh


def check_offsets(case: str) -> Callable[[Context], Outcome]:
    """Loss call with tensors past 2^31 elements; the last rows' ce and gradient against `offsets_truth`.

    pass: ``|ce - ce_torch| <= 2e-3 max(1, max|ce_torch|)`` and the gradient within 2% of its largest
    value (bf16 outputs); else fail. The smoke run exercises the same code at tiny shapes and records
    a skip: nothing there passes 2^31.
    """

    def run(ctx: Context) -> Outcome:
        import rho_fused

        n, d, v = ctx.sizes.offsets[case]
        rows = min(ctx.sizes.offsets_rows, n, v)
        hidden, weight, targets, ref_loss = offsets_inputs(ctx, n, d, v)
        loss, stats = rho_fused.fused_selective_loss(
            hidden, weight, targets, ref_loss, keep_ratio=KEEP, reduction="sum", backend="triton", return_stats=True
        )
        loss.backward()
        ce_t, grad_t = offsets_truth(hidden, weight, targets, stats.kept, rows, case)
        grad = weight.grad[-rows:] if case == "vd" else hidden.grad[-rows:]
        ce_err = max_abs(stats.ce[-rows:], ce_t) / max(1.0, ce_t.abs().max().item())
        grad_err = max_abs(grad, grad_t) / max(grad_t.abs().max().item(), 1e-30)
        sizes = {"N*D": n * d, "V*D": v * d, "N*V": n * v}
        figures = {
            "n": n,
            "d": d,
            "v": v,
            "rows": rows,
            "ce_rel_err": ce_err,
            "grad_rel_err": grad_err,
            "past_2^31": [k for k, s in sizes.items() if s > 2**31],
        }
        status = "pass" if ce_err <= 2e-3 and grad_err <= 2e-2 else "fail"
        reason = None if status == "pass" else f"{OFFSET_CASES[case]}: ce {ce_err:.2g}, gradient {grad_err:.2g} off"
        if ctx.smoke and status == "pass":
            return Outcome(
                "skip",
                figures,
                "smoke: tiny stand-in shape (the check's code ran and agreed); 2^31-element tensors need the GPU",
            )
        return Outcome(status, figures, reason)

    return run


def section_offsets(ctx: Context) -> Section:
    return Section(
        6,
        "Offsets past 2^31 elements",
        [Check(f"offsets/{case}", check_offsets(case), ctx.estimate(12)) for case in OFFSET_CASES],
    )


# --------------------------------------------------------------------------------------------------
# 7. torch.compile and autocast


def small_inputs(ctx: Context, dtype: torch.dtype, seed: int = 3) -> tuple[torch.Tensor, ...]:
    """``hidden [B, T, D]`` and ``weight [V, D]`` leaves in ``dtype`` (logits of std `LOGIT_STD`),
    targets with 10% ignored, a random reference loss."""
    (b, t), (d, v) = ctx.sizes.compile_bt, ctx.sizes.compile_dv
    g = generator(ctx.device, seed)
    hidden = torch.randn(b, t, d, generator=g, device=ctx.device).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g, device=ctx.device) * (LOGIT_STD / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g, device=ctx.device)
    targets[torch.rand(b, t, generator=g, device=ctx.device) < 0.1] = IGNORE
    ref_loss = torch.rand(b, t, generator=g, device=ctx.device) * 10
    return hidden, weight.requires_grad_(True), targets, ref_loss


def train_step(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ref_loss: torch.Tensor) -> torch.Tensor:
    """The end of a training step: an RMS norm ``h = x / sqrt(mean(x^2) + 1e-6)``, then the SLM loss
    (keep 0.6, sequence scope, triton backend)."""
    import rho_fused

    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return rho_fused.fused_selective_loss(
        h, weight, targets, ref_loss, keep_ratio=KEEP, scope="sequence", backend="triton"
    )


def loss_and_grads(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """``[loss, d x, d weight]`` of ``fn`` on fresh leaves holding the values of ``inputs``."""
    x, w = (t.detach().clone().requires_grad_(True) for t in inputs[:2])
    loss = fn(x, w, *inputs[2:])
    return [loss.detach(), *torch.autograd.grad(loss, [x, w])]


def relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    """``max|got - want| / max|want|`` for each pair."""
    return [max_abs(g, w) / max(w.abs().max().item(), 1e-30) for g, w in zip(got, want, strict=True)]


def check_compile(fullgraph: bool) -> Callable[[Context], Outcome]:
    """``torch.compile`` (inductor) of `train_step` against eager, fp32: loss within 1e-5 and gradients
    within 1e-4 of their largest value is a pass, within 1e-2 a warn, else a fail."""

    def run(ctx: Context) -> Outcome:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        inputs = small_inputs(ctx, torch.float32)
        eager = loss_and_grads(train_step, inputs)
        compiled = loss_and_grads(torch.compile(train_step, backend="inductor", fullgraph=fullgraph), inputs)
        errors = relative_errors(compiled, eager)
        figures = {
            "loss_rel": errors[0],
            "grad_rel": max(errors[1:]),
            "graph_breaks": sum(counters["graph_break"].values()),
        }
        tight = errors[0] <= 1e-5 and max(errors[1:]) <= 1e-4
        status = "pass" if tight else "warn" if max(errors) <= 1e-2 else "fail"
        return Outcome(status, figures, None if tight else "compiled step differs from eager")

    return run


def head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ref_loss: torch.Tensor
) -> torch.Tensor:
    """The SLM loss alone (keep 0.6, sequence scope, triton backend)."""
    import rho_fused

    return rho_fused.fused_selective_loss(
        hidden, weight, targets, ref_loss, keep_ratio=KEEP, scope="sequence", backend="triton"
    )


def check_autocast(ctx: Context) -> Outcome:
    """Under ``torch.autocast(device, bfloat16)`` with fp32 leaves, the loss and gradients equal those of
    the same values cast to bf16 (gradients returned in fp32), as for ``F.linear``: bitwise is a pass,
    within 4 bf16 ulps of the largest value a warn, else a fail (for instance, autocast ignored: the
    fp32 result)."""
    inputs = small_inputs(ctx, torch.float32)
    with torch.autocast(device_type=ctx.device, dtype=torch.bfloat16):
        auto = loss_and_grads(head_loss, inputs)
    cast = loss_and_grads(head_loss, (inputs[0].bfloat16(), inputs[1].bfloat16(), *inputs[2:]))
    fp32 = loss_and_grads(head_loss, inputs)
    dtypes_ok = all(g.dtype == torch.float32 for g in auto[1:])
    same = dtypes_ok and all(bitwise(a, c.to(a.dtype)) for a, c in zip(auto, cast, strict=True))
    errors = relative_errors(auto, [c.float() for c in cast])
    figures = {
        "bitwise": same,
        "grad_dtypes_fp32": dtypes_ok,
        "rel_vs_bf16": max(errors),
        "loss_rel_vs_fp32": relative_errors(auto[:1], fp32[:1])[0],
        "bf16_loss_rel_vs_fp32": relative_errors(cast[:1], fp32[:1])[0],
    }
    if same:
        return Outcome("pass", figures)
    close = dtypes_ok and max(errors) <= 4 * 2**-8
    return Outcome("warn" if close else "fail", figures, "autocast result differs from the bf16 inputs' result")


def section_compile(ctx: Context) -> Section:
    return Section(
        7,
        "torch.compile and autocast",
        [
            Check("compile/inductor", check_compile(False), ctx.estimate(40) if not ctx.smoke else 12),
            Check("compile/fullgraph", check_compile(True), ctx.estimate(30) if not ctx.smoke else 8),
            Check("autocast/bf16", check_autocast, ctx.estimate(5)),
        ],
    )


# --------------------------------------------------------------------------------------------------
# 8. A sweep of tile configurations (reported, not applied)


def tile(n: int, v: int, d: int, warps: int = 8, stages: int = 3, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of a ``ForwardConfig`` / ``BackwardConfig``: block sizes, warps, stages, the rest."""
    return {"block_n": n, "block_v": v, "block_d": d, "num_warps": warps, "num_stages": stages, **extra}


def forward_configs(ctx: Context) -> dict[str, Any]:
    """Forward tiles to time, the launcher's default first."""
    from rho_fused.kernels.forward import ForwardConfig, default_config

    if ctx.smoke:
        shapes = [tile(16, 32, 16, splits=2), tile(32, 32, 16), tile(16, 64, 16, splits=3)]
    else:
        shapes = [
            tile(128, 256, 64),
            tile(256, 128, 64),
            tile(256, 128, 64, 8, 4),
            tile(256, 128, 32, 8, 4),
            tile(256, 64, 64, 8, 3),
            tile(128, 128, 64, 8, 3),
            tile(128, 128, 32, 4, 4),
            tile(64, 128, 64, 4, 3),
        ]
    tiles = ([] if ctx.smoke else [default_config(torch.bfloat16)]) + [ForwardConfig(**t) for t in shapes]
    return {f"n{c.block_n}v{c.block_v}d{c.block_d}w{c.num_warps}s{c.num_stages}": c for c in tiles}


def backward_configs(ctx: Context) -> dict[str, Any]:
    """Backward (``dz`` kernel) tiles to time, the launcher's default first."""
    from rho_fused.kernels.backward import BackwardConfig, default_config

    if ctx.smoke:
        shapes = [tile(16, 32, 16, group_n=2), tile(32, 32, 16, group_n=1), tile(16, 64, 16, group_n=4, budget_bytes=1)]
    else:
        shapes = [
            tile(128, 256, 64, group_n=8),
            tile(256, 128, 64, group_n=8),
            tile(256, 128, 64, 8, 4, group_n=8),
            tile(256, 128, 32, 8, 4, group_n=8),
            tile(256, 128, 64, group_n=16),
            tile(128, 128, 64, 8, 3, group_n=8),
            tile(64, 128, 64, 4, 3, group_n=8),
        ]
    tiles = ([] if ctx.smoke else [default_config(torch.bfloat16)]) + [BackwardConfig(**t) for t in shapes]
    return {f"n{c.block_n}v{c.block_v}d{c.block_d}g{c.group_n}w{c.num_warps}s{c.num_stages}": c for c in tiles}


@dataclass
class SweepInputs:
    """bf16 inputs at the sweep's shape, every row valid, 60% of rows kept, ``lse`` from the default forward."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    count: torch.Tensor
    kept_rows: torch.Tensor
    kept_count: torch.Tensor
    capacity: int
    lse: torch.Tensor
    grad: torch.Tensor
    default: dict[str, Any] = field(default_factory=dict)  # the default configurations' results and times


def sweep_inputs(ctx: Context) -> SweepInputs:
    from rho_fused.kernels.compact import compact_mask
    from rho_fused.kernels.forward import logsumexp_partials

    n, d, v = ctx.sizes.sweep_ndv
    g = generator(ctx.device, 11)
    dtype = torch.bfloat16
    hidden = torch.randn(n, d, generator=g, device=ctx.device).to(dtype)
    weight = (torch.randn(v, d, generator=g, device=ctx.device) * (LOGIT_STD / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=ctx.device)
    rows, count = compact_mask(torch.ones(n, dtype=torch.bool, device=ctx.device))
    capacity = math.ceil(KEEP * n)
    kept = torch.zeros(n, dtype=torch.bool, device=ctx.device)
    kept[torch.randperm(n, generator=g, device=ctx.device)[:capacity]] = True
    kept_rows, kept_count = compact_mask(kept)
    part_m, part_s, _ = logsumexp_partials(hidden, weight, None, targets, rows, count, None)
    lse = torch.logsumexp(part_m + part_s.log(), 0)
    grad = torch.full((1,), 1.0 / capacity, device=ctx.device)
    return SweepInputs(hidden, weight, targets, rows, count, kept_rows, kept_count, capacity, lse, grad)


def sweep_figures(ctx: Context, times: list[float], flops: float, default_key: str, inp: SweepInputs) -> dict[str, Any]:
    ms = 1e3 * statistics.median(times)
    base = inp.default.get(default_key)
    return {
        "ms": ms,
        "tflops": flops / (ms / 1e3) / 1e12,
        "vs_default": None if base is None else ms / base,
        "x_matmul": flops / (ms / 1e3) / ctx.matmul_flops if ctx.matmul_flops else None,
    }


def out_of_resources(exc: Exception) -> bool:
    """A configuration the GPU cannot hold (shared memory, registers): Triton's OutOfResources."""
    return type(exc).__name__ in ("OutOfResources", "OutOfResourcesError")


def check_sweep_forward(config: Any, first: bool) -> Callable[[Context], Outcome]:
    """Forward kernel time at the sweep's shape (TFLOP/s on ``2 N D V``) and its ``lse`` against the
    default configuration's (within 1e-3, else a fail). A tile the GPU cannot hold is a warn."""

    def run(ctx: Context) -> Outcome:
        from rho_fused.kernels.forward import logsumexp_partials

        inp: SweepInputs = ctx.cached(("sweep",), lambda: sweep_inputs(ctx))
        n, d, v = ctx.sizes.sweep_ndv

        def call() -> tuple[torch.Tensor, ...]:
            return logsumexp_partials(
                inp.hidden, inp.weight, None, inp.targets, inp.rows, inp.count, None, config=config
            )

        try:
            times = time_calls(call, ctx.device, ctx.sizes.sweep_reps)
        except Exception as exc:
            if out_of_resources(exc):
                return Outcome("warn", {}, f"does not fit: {str(exc)[:150]}")
            raise
        part_m, part_s, _ = call()
        err = max_abs(torch.logsumexp(part_m + part_s.log(), 0), inp.lse)
        figures = {
            **sweep_figures(ctx, times, 2.0 * n * d * v, "forward", inp),
            "splits": part_m.shape[0],
            "lse_err": err,
        }
        if first:
            inp.default["forward"] = figures["ms"]
        return Outcome("pass" if err <= 1e-3 else "fail", figures, None if err <= 1e-3 else "lse differs from default")

    return run


def check_sweep_backward(config: Any, first: bool) -> Callable[[Context], Outcome]:
    """Backward (dz kernel plus its cuBLAS matmuls) time at the sweep's shape, TFLOP/s on ``6 C D V``
    (``C`` kept rows), and d hidden, d weight against the default configuration's (within 2% of the
    largest value, else a fail)."""

    def run(ctx: Context) -> Outcome:
        from rho_fused.kernels.backward import kept_rows_backward

        inp: SweepInputs = ctx.cached(("sweep",), lambda: sweep_inputs(ctx))
        n, d, v = ctx.sizes.sweep_ndv

        def call(cfg: Any = config) -> tuple[torch.Tensor | None, ...]:
            return kept_rows_backward(
                inp.hidden,
                inp.weight,
                None,
                inp.targets,
                inp.lse,
                inp.grad,
                inp.kept_rows,
                inp.kept_count,
                None,
                (True, True, False),
                capacity=inp.capacity,
                config=cfg,
            )

        try:
            times = time_calls(call, ctx.device, ctx.sizes.sweep_reps)
        except Exception as exc:
            if out_of_resources(exc):
                return Outcome("warn", {}, f"does not fit: {str(exc)[:150]}")
            raise
        dh, dw, _ = call()
        figures = sweep_figures(ctx, times, 6.0 * inp.capacity * d * v, "backward", inp)
        if first:
            inp.default["backward"] = figures["ms"]
        if "grads" not in inp.default:  # the default configuration's, whichever check runs first
            inp.default["grads"] = (dh, dw) if first else call(None)[:2]
        err = max(relative_errors([dh, dw], list(inp.default["grads"])))
        figures["grad_rel_vs_default"] = err
        return Outcome("pass" if err <= 2e-2 else "fail", figures, None if err <= 2e-2 else "gradients differ")

    return run


def section_sweep(ctx: Context) -> Section:
    checks = []
    for i, (label, cfg) in enumerate(forward_configs(ctx).items()):
        checks.append(Check(f"sweep/forward/{label}", check_sweep_forward(cfg, i == 0), ctx.estimate(4)))
    for i, (label, cfg) in enumerate(backward_configs(ctx).items()):
        checks.append(Check(f"sweep/backward/{label}", check_sweep_backward(cfg, i == 0), ctx.estimate(5)))
    return Section(8, "Tile configurations of the forward and backward kernels", checks)


# --------------------------------------------------------------------------------------------------
# 9. Scoring throughput: the reference-scoring path against the Hugging Face logits path


def check_scoring(ctx: Context) -> Outcome:
    """`bench/score_throughput.py`: rho_fused's scorer (the model's body, then `token_losses`) against
    ``model(...).logits`` + ``F.cross_entropy(reduction="none")`` on the same batches of random ids, a
    randomly initialised Llama (GPU: 16 layers, D=2048, V=128256, 8 x 2048 tokens, bf16). Tokens/s and
    peak memory above the model of each, in ``score-throughput.json`` beside the results. The per-token
    losses must agree within 0.1 (the HF path rounds its logits to bf16) or 1e-4 in fp32, else a fail."""
    import score_throughput

    out = (ctx.out or Path(".")) / "score-throughput.json"
    tiny = ["--layers", "1", "--dim", "32", "--heads", "2", "--vocab", "96", "--batch", "2", "--seq-len", "24"]
    argv = (tiny + ["--reps", "2", "--dtype", "float32", "--device", "cpu"]) if ctx.smoke else ["--preset", "gpu"]
    result = score_throughput.main([*argv, "--out", str(out)])
    figures = {
        "shape": "x".join(str(result["shape"][k]) for k in ("layers", "dim", "vocab", "batch", "seq_len")),
        "dtype": result["shape"]["dtype"],
        "hf_tokens_s": result["hf"]["tokens_per_s"],
        "rho_fused_tokens_s": result["rho_fused"]["tokens_per_s"],
        "speed_vs_hf": result["rho_fused"]["tokens_per_s"] / result["hf"]["tokens_per_s"],
        "hf_peak_mib": result["hf"]["peak_mib"],
        "rho_fused_peak_mib": result["rho_fused"]["peak_mib"],
        "max_abs_diff": result["max_abs_diff"],
    }
    limit = 1e-4 if result["shape"]["dtype"] == "float32" else 0.1
    ok = math.isfinite(result["max_abs_diff"]) and result["max_abs_diff"] <= limit
    return Outcome("pass" if ok else "fail", figures, None if ok else f"losses differ by more than {limit}")


def section_scoring(ctx: Context) -> Section:
    return Section(9, "Scoring throughput", [Check("score/throughput", check_scoring, ctx.estimate(45))])


# --------------------------------------------------------------------------------------------------
# The summary, the command line


SECTION_BUILDERS: tuple[Callable[[Context], Section], ...] = (
    section_env,
    section_index_kernels,
    section_parity,
    section_variants,
    section_sync,
    section_timing,
    section_offsets,
    section_compile,
    section_sweep,
    section_scoring,
)


def build_sections(ctx: Context) -> list[Section]:
    """Every section's checks; a section that cannot even list its checks becomes one check that errors."""
    sections = []
    for number, builder in enumerate(SECTION_BUILDERS, start=1):
        try:
            sections.append(builder(ctx))
        except Exception as exc:
            sections.append(
                Section(number, builder.__name__, [Check(f"{builder.__name__}/build", failing_check(exc), 0)])
            )
    return sections


TILE_LABEL = re.compile(r"n(\d+)v(\d+)d(\d+)(?:g(\d+))?w(\d+)s(\d+)")


def parse_tile(label: str) -> dict[str, Any]:
    """``n256v128d64w8s3`` (forward) or ``n256v128d64g8w8s3`` (backward, ``g`` = group_n) as config kwargs."""
    m = TILE_LABEL.fullmatch(label)
    if m is None:
        raise ValueError(f"--tiles: expected a label like n128v128d64w8s3 (g8 before w: backward), got {label!r}")
    n, v, d, g, w, st = m.groups()
    return tile(int(n), int(v), int(d), int(w), int(st), **({} if g is None else {"group_n": int(g)}))


def use_tiles(spec: str) -> None:
    """``--tiles FORWARD,BACKWARD``: the forward and backward kernels' 16-bit launch configurations for
    this run (fp32 keeps its own), to check and time a candidate default before it is made one."""
    from rho_fused.kernels import backward, forward

    labels = spec.split(",")
    if len(labels) != 2:
        raise ValueError(f"--tiles: expected FORWARD,BACKWARD labels, got {spec!r}")
    f_cfg = forward.ForwardConfig(**parse_tile(labels[0]))
    b_cfg = backward.BackwardConfig(**parse_tile(labels[1]))
    f_default, b_default = forward.default_config, backward.default_config
    forward.default_config = lambda dtype: f_default(dtype) if dtype == torch.float32 else f_cfg
    backward.default_config = lambda dtype: b_default(dtype) if dtype == torch.float32 else b_cfg


def use_small_tiles() -> None:
    """The smoke run's launcher defaults: 16/32 tiles (as the test suite's ``small_blocks``), so that tiny
    shapes span several tiles in every dimension; the forward splits the vocabulary in two."""
    from rho_fused.kernels import backward, compact, forward, merge, select

    forward.default_config = lambda dtype: forward.ForwardConfig(block_n=16, block_v=32, block_d=16, splits=2)
    backward.default_config = lambda dtype: backward.BackwardConfig(block_n=16, block_v=32, block_d=16, group_n=2)
    for module, config in ((compact, "CompactConfig"), (merge, "MergeConfig"), (select, "SelectConfig")):
        if hasattr(module, "DEFAULT_CONFIG") and hasattr(module, config):
            module.DEFAULT_CONFIG = getattr(module, config)(block=32)


def result_name(device: str) -> str:
    """``gpu-check-<device>-torch<version>-triton<version>[-cuda<version>]``, for the output folder."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-smoke"
    cuda = f"-cuda{torch.version.cuda}" if torch.version.cuda else ""
    return slug(f"gpu-check-{name}-torch{torch.__version__}-triton{triton_version}{cuda}")


def md_cell(text: str, limit: int = 400) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def timing_table(records: list[dict[str, Any]]) -> list[str]:
    """The timing section as one table: a row per method, task and shape that ran."""
    rows = [r for r in records if r["name"].startswith("timing/") and "ms" in r.get("figures", {})]
    if not rows:
        return []
    lines = [
        "| task | N x D x V | method | ms | TFLOP/s | x matmul | peak GiB | loss | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        f = r["figures"]
        cells = [
            f["task"],
            f["shape"],
            f["method"],
            *(_fmt(f.get(k)) for k in ("ms", "tflops", "x_matmul", "peak_gib", "loss")),
        ]
        lines.append("| " + " | ".join([*cells, r["status"]]) + " |")
    return [
        "## Time and peak memory",
        "",
        "Forward+backward, median after a warm-up; TFLOP/s on the useful work ((2 + 6r) N D V for SLM at"
        " r = 0.6, 6 N D V for CE); x matmul: over the measured matmul rate; peak: growth of"
        " `max_memory_allocated` over one step, gradients included.",
        "",
        *lines,
        "",
    ]


def write_summary(rec: Recorder, sections: list[Section], ctx: Context, command: str, restarts: int = 0) -> None:
    """``gpu_check.md``: the run's set-up, counts by status, a table per section, the timing table."""
    with rec.lock:
        records = list(rec.records)
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    figures = {r["name"]: r.get("figures", {}) for r in records}
    v, d = figures.get("env/versions", {}), figures.get("env/device", {})
    rate = figures.get("env/matmul_rate", {}).get("tflops")
    mode = " Smoke run: tiny shapes on CPU under Triton's interpreter; no figure here is a GPU's." if ctx.smoke else ""
    if restarts:
        mode += f" Restarted {restarts} time(s) after the CUDA context was lost."
    lines = [
        "# GPU check",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M:%S')}, {time.monotonic() - ctx.start:.0f} s"
        f" (budget {ctx.budget_s:.0f} s).{mode}",
        "",
        f"Device: {d.get('name')} (SMs: {d.get('sm_count', '-')}, memory GiB: {_fmt(d.get('memory_gib', '-'))});"
        f" python {v.get('python')}, torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')},"
        f" transformers {v.get('transformers')}, liger-kernel {v.get('liger_kernel')},"
        f" cut-cross-entropy {v.get('cut_cross_entropy')}; commit {v.get('commit')};"
        f" matmul rate {_fmt(rate)} TFLOP/s.",
        "",
        "| " + " | ".join(STATUSES) + " |",
        "| " + " | ".join("---:" for _ in STATUSES) + " |",
        "| " + " | ".join(str(counts[s]) for s in STATUSES) + " |",
        "",
    ]
    by_section: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_section.setdefault(r["section"], []).append(r)
    for sec in sections:
        lines += [
            f"## {sec.number}. {sec.title}",
            "",
            "| check | status | s | figures / reason |",
            "| --- | --- | ---: | --- |",
        ]
        for r in by_section.get(sec.number, []):
            note = "; ".join(x for x in (_brief(r), r.get("reason") or "") if x)
            lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {md_cell(note)} |")
        lines.append("")
    lines += timing_table(records)
    for r in by_section.get(0, []):
        lines += [f"**{r['name']}: {r['status']}**: {r.get('reason')}", ""]
    (rec.out / "gpu_check.md").write_text("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        default=str(HERE / "results" / "{name}"),
        help="output folder; {name} becomes gpu-check-<device>-torch<v>-triton<v>-cuda<v> "
        "(default: bench/results/{name})",
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all checks (default 420)")
    parser.add_argument("--grace-s", type=float, default=45.0, help="the watchdog ends the run at budget + grace")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--only", help="regular expression: run only the checks whose names match it")
    parser.add_argument(
        "--tiles", help="FORWARD,BACKWARD tile labels (n256v128d64w8s3,n256v128d64g8w8s3) for 16-bit inputs"
    )
    parser.add_argument("--resume", type=float, help=argparse.SUPPRESS)  # a restart: the first run's start
    parser.add_argument("--restarts", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lose-context-after", help=argparse.SUPPRESS)  # tests: act as if CUDA broke there
    args = parser.parse_args(argv)
    labels = args.tiles.split(",") if args.tiles else []
    if args.tiles and len(labels) != 2:
        parser.error(f"--tiles: expected FORWARD,BACKWARD labels, got {args.tiles!r}")
    for label in labels:
        try:
            parse_tile(label)
        except ValueError as exc:
            parser.error(str(exc))
    return args


MAX_RESTARTS = 3


def canonical_command(args: argparse.Namespace, out: Path) -> str:
    """The command line of this run, without the options a restart adds."""
    parts = ["python bench/gpu_check.py", "--out", str(out), "--budget-s", f"{args.budget_s:g}"]
    parts += ["--smoke"] if args.smoke else []
    parts += ["--only", repr(args.only)] if args.only else []
    parts += ["--tiles", args.tiles] if args.tiles else []
    return " ".join(parts)


def restart(args: argparse.Namespace, out: Path, start: float) -> None:
    """Replace this process by a fresh one that continues the run (same folder, same budget clock)."""
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--out",
        str(out),
        "--budget-s",
        repr(args.budget_s),
        "--grace-s",
        repr(args.grace_s),
        "--resume",
        repr(start),
        "--restarts",
        str(args.restarts + 1),
    ]
    argv += ["--smoke"] if args.smoke else []
    argv += ["--only", args.only] if args.only else []
    argv += ["--tiles", args.tiles] if args.tiles else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def failing_check(exc: Exception) -> Callable[[Context], Outcome]:
    """A check function that raises ``exc`` (set-up or section errors, recorded like any other)."""

    def run(ctx: Context) -> Outcome:
        raise exc

    return run


def prepare(ctx: Context, tiles: str | None = None) -> list[Section]:
    """Import the package (and, in the smoke run, correct the interpreter and shrink the tiles; with
    ``tiles``, set the 16-bit launch configurations), then list every section's checks; a failure here
    becomes one ``setup`` check that errors."""
    try:
        ensure_package()
        if ctx.smoke:
            load_interpreter_patches()
            use_small_tiles()
        if tiles:
            use_tiles(tiles)
        return build_sections(ctx)
    except Exception as exc:
        return [Section(0, "Set-up", [Check("setup", failing_check(exc), 0.0)])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        if not args.smoke:
            print("no CUDA device (or TRITON_INTERPRET=1): running the smoke checks on CPU", flush=True)
    ctx = Context("cpu" if smoke else "cuda", smoke, SMOKE_SIZES if smoke else GPU_SIZES, args.budget_s)
    if args.resume is not None:
        ctx.start = args.resume
    rec = Recorder(Path(args.out.replace("{name}", result_name(ctx.device))), resume=args.resume is not None)
    ctx.out = rec.out
    command = canonical_command(args, rec.out)
    sections = prepare(ctx, args.tiles)
    summary = lambda: write_summary(rec, sections, ctx, command, args.restarts)  # noqa: E731
    start_watchdog(ctx, rec, args.budget_s + args.grace_s, summary)
    try:
        run_sections(sections, ctx, rec, args.only, args.lose_context_after if args.restarts == 0 else None)
    except ContextLost as lost:
        summary()
        if args.restarts < MAX_RESTARTS:
            print(f"CUDA context lost after {lost}: restarting for the remaining checks", flush=True)
            restart(args, rec.out, ctx.start)
        for sec in sections:
            for c in sec.checks:
                if c.name not in {r["name"] for r in rec.records}:
                    rec.write(skipped(c, ctx, sec.number, f"CUDA context lost after {lost}, {MAX_RESTARTS} restarts"))
    finally:
        summary()
    bad = [r["name"] for r in rec.records if r["status"] in ("fail", "error")]
    counts = ", ".join(f"{s} {sum(r['status'] == s for r in rec.records)}" for s in STATUSES)
    print(f"{counts}; wrote {rec.out / 'gpu_check.jsonl'} and gpu_check.md", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
