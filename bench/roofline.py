"""Roofline MODEL of the fused Triton kernels on an H100 -- a model, not a measurement.

    python bench/roofline.py            # markdown table, keep 0.6, bf16
    python bench/roofline.py --csv      # the same rows as CSV

For each kernel: the matmul flops it must do and the HBM bytes it must move, and the time an H100
would need if it ran at PEAK_FLOPS (dense bf16 tensor cores) or at HBM_BYTES_PER_S, whichever
bounds it. Assumptions, all optimistic in the same way for both sides:

* every token valid; ``n_kept = keep * N``;
* HBM traffic is compulsory traffic: each tensor read or written once per kernel. Re-reads of
  ``hidden`` and ``weight`` tiles in the Triton matmul kernels (every row tile meets every
  vocabulary tile) are assumed to hit L2; their volume is reported apart as ``l2_gb``;
* compact and select are single programs (one per selection group for select), streaming at an
  assumed ONE_SM_BYTES_PER_S, one SM's share of bandwidth;
* elementwise work (exp, log, the radix passes) is not counted in flops; ``N * V`` exponentials
  (1.05e9 at N=8k, V=128k) take about 0.3 ms on the H100's special-function units, about 3 % of
  the forward matmul -- noted, not modelled;
* the launches are the launchers' own: `rho_fused.kernels.plan.launch_plan` on an H100's SMs with
  the default bf16 tiles gives the forward's vocabulary splits and the backward's chunks;
* the backward (`rho_fused.kernels.backward`) walks the vocabulary in chunks of ``Vc`` columns
  (the launcher's memory budget for the ``[C, Vc]`` bf16 ``dz`` buffer, ``C = ceil(keep * N)`` kept
  rows). Per chunk: the Triton ``dz`` kernel recomputes the logits of the kept rows (``2 C D Vc``
  flops) and writes ``dz``; cuBLAS reads it twice, for ``dH += dz @ W`` (fp32 product, added to an
  fp32 accumulator) and ``dW = dz^T H[K]``, ``2 C D Vc`` flops each. cuBLAS is assumed to run at the
  same PEAK_FLOPS; the ``dz`` round trip through HBM (written once, read twice: ``3 C V 2`` bytes)
  and the fp32 ``dH`` traffic are counted. ``glue`` is the gather of ``H[K]`` and the scatter of
  ``dH`` into the ``[N, D]`` gradient. No atomics;
* every token is valid, so the capacity the backward's matmuls are sized by equals the kept
  count; with ignored tokens they also multiply ``keep * n_ignored`` zero rows (not modelled).

The materialising baseline (logits in bf16, PyTorch's ``F.cross_entropy``) does ``6 N D V``
flops and moves logits-sized tensors through HBM: ``z`` written, read by log-softmax, its output
written and read by the loss and its backward, ``dz`` written and read by both gradient matmuls:
7 passes of ``N * V * 2`` bytes, on top of the same compulsory traffic of the inputs.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import torch
from rho_fused.kernels import backward, forward
from rho_fused.kernels.plan import H100_SMS, LaunchPlan, launch_plan

from rho_fused.problem import keep_count_int

PEAK_FLOPS = 800e12  # bf16 dense tensor-core rate assumed for an H100 SXM (the spec sheet says 989)
HBM_BYTES_PER_S = 3.0e12  # HBM3 bandwidth assumed (spec: 3.35 TB/s)
# compact and select run one program (per selection group): one SM streams the data. Assumed rate.
ONE_SM_BYTES_PER_S = 100e9
SINGLE_PROGRAM = ("compact valid", "select", "compact kept")
DTYPE = torch.bfloat16
ELEM = 2  # bytes of a bf16 element
F32, I64, I32 = 4, 8, 4

NS = (8192, 32768)
DS = (2048, 4096)
VS = (32000, 128256, 256000)
KEEP = 0.6


@dataclass(frozen=True)
class Row:
    shape: str
    kernel: str
    gflop: float
    hbm_gb: float
    l2_gb: float

    @property
    def bandwidth(self) -> float:
        return ONE_SM_BYTES_PER_S if self.kernel in SINGLE_PROGRAM else HBM_BYTES_PER_S

    @property
    def ms(self) -> float:
        return 1e3 * max(self.gflop * 1e9 / PEAK_FLOPS, self.hbm_gb * 1e9 / self.bandwidth)

    @property
    def bound(self) -> str:
        if self.gflop * 1e9 / PEAK_FLOPS >= self.hbm_gb * 1e9 / self.bandwidth:
            return "flops"
        return "one SM" if self.kernel in SINGLE_PROGRAM else "memory"


def plan(n: int, d: int, v: int, keep: float) -> LaunchPlan:
    """What the launchers launch on an H100 for ``n`` bf16 rows, every one valid, ``keep`` kept."""
    return launch_plan(
        n,
        d,
        v,
        DTYPE,
        sms=H100_SMS,
        capacity=keep_count_int(n, keep),
        forward_config=forward.default_config(DTYPE),
        backward_config=backward.default_config(DTYPE),
    )


def fused(n: int, d: int, v: int, keep: float) -> list[tuple[str, float, float, float]]:
    """``(kernel, flops, hbm_bytes, l2_bytes)`` of one forward + backward of the fused loss."""
    k = keep * n
    launch = plan(n, d, v, keep)
    s, chunks = launch.forward.splits, launch.backward.chunks
    fc, bc = forward.default_config(DTYPE), backward.default_config(DTYPE)
    # operand tiles fetched by all programs: every row tile meets every vocabulary tile
    tiles = n * v * d * ELEM * (1 / fc.block_n + 1 / fc.block_v)
    dz_tiles = k * v * d * ELEM * (1 / bc.block_n + 1 / bc.block_v)
    dz = k * v * ELEM  # the kept rows' dz, all chunks
    return [
        ("compact valid", 0.0, n * (1 + I32), 0.0),
        # z = H W^T over every valid row: H, W, targets and row list in; (max, sum, target) partials out
        ("forward", 2.0 * n * d * v, (n * d + v * d) * ELEM + n * (I64 + I32) + 3 * s * n * F32, tiles),
        ("merge", 0.0, 3 * s * n * F32 + n * (I64 + F32) + 3 * n * F32, 0.0),
        # five passes (four radix digits and the final mask) over excess and targets
        ("select", 0.0, 5 * n * (F32 + I64) + n, 0.0),
        ("compact kept", 0.0, n * (1 + I32), 0.0),
        # recompute z for the kept rows (2kDV): H rows, W, per-row targets / lse / g / row ids in; dz out
        ("backward dz (Triton)", 2.0 * k * d * v, k * d * ELEM + v * d * ELEM + k * (I64 + 3 * F32) + dz,
         dz_tiles),
        # dH_acc += dz @ W[chunk] (2kDV): dz and W in; per chunk the fp32 product out, then read with
        # the accumulator and the sum written back
        ("backward dH = dz W (cuBLAS)", 2.0 * k * d * v, dz + v * d * ELEM + chunks * 4 * k * d * F32, 0.0),
        # dW[chunk] = dz^T H[K] (2kDV): dz in, H[K] in once per chunk, dW out in bf16
        ("backward dW = dz^T H (cuBLAS)", 2.0 * k * d * v, dz + chunks * k * d * ELEM + v * d * ELEM, 0.0),
        # gather H[K] (read, write); zero the [N, D] d hidden, scale and cast dH_acc, scatter it
        ("backward glue", 0.0, 2 * k * d * ELEM + n * d * ELEM + k * d * (F32 + 2 * ELEM), 0.0),
    ]  # fmt: skip


def baseline(n: int, d: int, v: int) -> tuple[float, float]:
    """``(flops, hbm_bytes)`` of the materialising baseline: 6NDV, inputs + grads, 7 logits passes."""
    return 6.0 * n * d * v, (n * d + v * d) * ELEM * 3 + 7 * n * v * ELEM


def rows(keep: float = KEEP) -> list[Row]:
    out = []
    for n, d, v in itertools.product(NS, DS, VS):
        shape = f"N={n} D={d} V={v}"
        for name, fl, hbm, l2 in fused(n, d, v, keep):
            out.append(Row(shape, name, fl / 1e9, hbm / 1e9, l2 / 1e9))
        fl, hbm = baseline(n, d, v)
        out.append(Row(shape, "baseline (materialised logits)", fl / 1e9, hbm / 1e9, 0.0))
    return out


def summary(keep: float = KEEP) -> list[tuple[str, float, float, float]]:
    """Per shape: ``(shape, fused ms, baseline ms, fused flops / baseline flops)``."""
    table = rows(keep)
    out = []
    for shape in dict.fromkeys(r.shape for r in table):
        mine = [r for r in table if r.shape == shape]
        fused_ms = sum(r.ms for r in mine if not r.kernel.startswith("baseline"))
        base = next(r for r in mine if r.kernel.startswith("baseline"))
        fused_gflop = sum(r.gflop for r in mine if not r.kernel.startswith("baseline"))
        out.append((shape, fused_ms, base.ms, fused_gflop / base.gflop))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", action="store_true")
    parser.add_argument("--keep", type=float, default=KEEP)
    args = parser.parse_args()
    table = rows(args.keep)
    if args.csv:
        print("shape,kernel,gflop,hbm_gb,l2_gb,model_ms,bound")
        for r in table:
            print(f"{r.shape},{r.kernel},{r.gflop:.1f},{r.hbm_gb:.3f},{r.l2_gb:.1f},{r.ms:.3f},{r.bound}")
        return
    print(
        f"MODEL (not a measurement): H100 at {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 and "
        f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s, keep {args.keep}, bf16\n"
    )
    print("| shape | fused fwd+bwd ms | baseline ms | fused / baseline flops | fused / baseline time |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for shape, f_ms, b_ms, ratio in summary(args.keep):
        print(f"| {shape} | {f_ms:.2f} | {b_ms:.2f} | {ratio:.3f} | {f_ms / b_ms:.3f} |")
    print("\nPer kernel at N=8192 D=4096 V=128256:\n")
    print("| kernel | GFLOP | HBM GB | L2 GB | model ms | bound |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in table:
        if r.shape == "N=8192 D=4096 V=128256":
            print(f"| {r.kernel} | {r.gflop:.1f} | {r.hbm_gb:.4f} | {r.l2_gb:.1f} | {r.ms:.4f} | {r.bound} |")


if __name__ == "__main__":
    main()
