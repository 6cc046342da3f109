"""Compile every kernel offline for sm_80 and sm_90 and report what the hardware would run.

    python -m rho_fused.kernels.report              # the configuration of the README
    python -m rho_fused.kernels.report --variants   # also fp16, fp32, and bias + softcap builds

No GPU is needed: `triton.compile` targets a `GPUTarget`, and the CUDA tools shipped in the triton
wheel read the cubin. Each kernel is compiled with the configuration its launcher really uses at
N=8192, D=4096, V=128256, bf16 (no bias, no softcap: the common LM head; the backward's ``dz``
kernel at keep 0.6 on a full vocabulary chunk of its memory budget), with the integer arguments
specialised as the JIT would (multiples of 16 marked divisible by 16). One line per kernel and
architecture:

    kernel=NAME arch=sm90 num_warps=W num_stages=S regs=R spill_bytes=B smem_bytes=M tensor_core_ops=K

``regs`` from ``cuobjdump -res-usage``; ``spill_bytes`` the spill stores ``ptxas -v`` reports for
the kernel's PTX; ``smem_bytes`` Triton's shared-memory allocation; ``tensor_core_ops`` the count
of HMMA / HGMMA instructions in the ``nvdisasm`` listing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import backward, compact, forward, merge, select
from .plan import H100_SMS, launch_plan

N, D, V = 8192, 4096, 128256
DTYPE = torch.bfloat16
ARCHS = (80, 90)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: object  # the @triton.jit function
    args: dict[str, object]  # argument -> value: a dtype string for pointers ("*bf16"), an int or float, or a constexpr
    constexprs: tuple[str, ...]
    num_warps: int
    num_stages: int


def _ptr(dtype: torch.dtype) -> str:
    return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def specs(dtype: torch.dtype = DTYPE, extras: bool = False) -> list[KernelSpec]:
    """The launchers' configurations at the report's shape for ``dtype``.

    ``extras=False``: the common LM head (no bias, no softcap, one upstream gradient for all rows).
    ``extras=True``: bias, softcap, d bias and a per-token upstream gradient (``reduction="none"``),
    and the contract's variants in the kernels: the forward's and merge's sum of the logits (label
    smoothing), the backward's per-row softmax coefficient (z-loss, a gradient of ``lse``) and
    smoothing terms.
    """
    fc, bc = forward.default_config(dtype), backward.default_config(dtype)
    sc, cc, mc = select.DEFAULT_CONFIG, compact.DEFAULT_CONFIG, merge.DEFAULT_CONFIG
    h = _ptr(dtype)
    softcap = 30.0 if extras else 1.0
    # The launch plan of an H100 (the launcher takes the SM count from the device) at N=8192, the
    # backward at keep 0.6 with every token valid: capacity ceil(0.6 N) kept rows; the dz kernel is
    # compiled for the second vocabulary chunk (v0 = n_cols = the chunk width).
    plan = launch_plan(N, D, V, dtype, sms=H100_SMS, capacity=-(-3 * N // 5), forward_config=fc, backward_config=bc)
    splits, v_per_split = plan.forward.splits, plan.forward.v_per_split
    capacity, chunk = plan.backward.capacity, plan.backward.chunk_columns
    return [
        KernelSpec(
            "compact", compact.compact_kernel,
            {"MASK": "*u8", "IDX": "*i32", "COUNT": "*i32", "N": N, "BLOCK": cc.block},
            ("BLOCK",), cc.num_warps, cc.num_stages,
        ),
        KernelSpec(
            "forward", forward.forward_kernel,
            {
                "H": h, "W": h, "B": h, "T": "*i64", "ROWS": "*i32", "COUNT": "*i32",
                "PART_M": "*fp32", "PART_S": "*fp32", "PART_T": "*fp32", "PART_Z": "*fp32",
                "N": N, "V": V, "D": D, "v_per_split": v_per_split, "softcap": softcap,
                "HAS_BIAS": extras, "HAS_SOFTCAP": extras, "HAS_ZSUM": extras, "BLOCK_N": fc.block_n,
                "BLOCK_V": fc.block_v, "BLOCK_D": fc.block_d, "DOT_PRECISION": forward.dot_precision(dtype),
            },
            ("HAS_BIAS", "HAS_SOFTCAP", "HAS_ZSUM", "BLOCK_N", "BLOCK_V", "BLOCK_D", "DOT_PRECISION"),
            fc.num_warps, fc.num_stages,
        ),
        KernelSpec(
            "merge", merge.merge_kernel,
            {
                "PART_M": "*fp32", "PART_S": "*fp32", "PART_T": "*fp32", "PART_Z": "*fp32", "T": "*i64",
                "REF": "*fp32", "LSE": "*fp32", "CE": "*fp32", "EXCESS": "*fp32", "ZSUM": "*fp32", "N": N,
                "S": splits, "ignore_index": -100, "HAS_REF": not extras, "HAS_ZSUM": extras, "BLOCK": mc.block,
            },
            ("HAS_REF", "HAS_ZSUM", "BLOCK"), mc.num_warps, mc.num_stages,
        ),
        KernelSpec(
            "select", select.select_kernel,
            {
                "EXCESS": "*fp32", "T": "*i64", "KEPT": "*u8", "THRESHOLD": "*fp32", "N_KEEP": "*i32",
                "N_VALID": "*i32", "M": N, "ignore_index": -100, "keep_p": 3, "keep_q": 5, "BLOCK": sc.block,
            },
            ("BLOCK",), sc.num_warps, sc.num_stages,
        ),
        KernelSpec(
            "backward", backward.dz_kernel,
            {
                "H": h, "W": h, "B": h, "T": "*i64", "LSE": "*fp32", "G": "*fp32", "A": "*fp32",
                "INV_SCALE": "*fp32", "ROWS": "*i32", "COUNT": "*i32", "DZ": h, "DB_PART": "*fp32", "V": V, "D": D,
                "C": capacity, "v0": chunk, "n_cols": chunk, "G_STRIDE": int(extras), "softcap": softcap,
                "smoothing": 0.1 if extras else 0.0, "HAS_BIAS": extras, "HAS_SOFTCAP": extras, "HAS_A": extras,
                "HAS_SMOOTH": extras, "NEED_DB": extras, "BLOCK_N": bc.block_n, "BLOCK_V": bc.block_v,
                "BLOCK_D": bc.block_d, "GROUP_N": bc.group_n, "DOT_PRECISION": forward.dot_precision(dtype),
            },
            ("HAS_BIAS", "HAS_SOFTCAP", "HAS_A", "HAS_SMOOTH", "NEED_DB", "BLOCK_N", "BLOCK_V", "BLOCK_D", "GROUP_N",
             "DOT_PRECISION"),
            bc.num_warps, bc.num_stages,
        ),
    ]  # fmt: skip


def _source(spec: KernelSpec) -> triton.compiler.ASTSource:
    """Signature and specialisation as the JIT would build them for these argument values.

    The JIT marks pointers (torch allocations are 16-byte aligned) and integers that are multiples
    of 16 divisible by 16, and turns an integer equal to 1 into a constant. Triton 3.2 takes
    ``constants`` by name with an ``AttrsDescriptor`` of argument indices and leaves constexprs out
    of the signature; from 3.3 on, ``constexprs`` and ``attrs`` keyed by argument path, and
    constexprs stay in the signature as ``"constexpr"``.
    """
    legacy = "constants" in inspect.signature(triton.compiler.ASTSource.__init__).parameters  # triton 3.2
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    hints: dict[int, int] = {}  # argument index -> 16 (divisible by 16) or 1 (equal to 1)
    for i, name in enumerate(spec.fn.arg_names):
        value = spec.args[name]
        if name in spec.constexprs:
            constexprs[name] = value
            if not legacy:
                signature[name] = "constexpr"
            continue
        if isinstance(value, str):
            signature[name] = value
            hints[i] = 16
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            constexprs[name] = 1
            signature[name] = "i32" if legacy else "constexpr"
            hints[i] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                hints[i] = 16
    if legacy:
        from triton.backends.compiler import AttrsDescriptor

        attrs = AttrsDescriptor.from_hints(hints)
        return triton.compiler.ASTSource(fn=spec.fn, signature=signature, constants=constexprs, attrs=attrs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, h in hints.items() if h == 16}
    return triton.compiler.ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas(arch: int) -> str:
    """Path of the ptxas triton itself runs for ``sm_<arch>`` (some wheels ship a second one for
    Blackwell). Its finder: none in 3.2, ``get_ptxas(arch) -> (path, version)`` in 3.3,
    ``get_ptxas() -> tool`` in 3.4 and 3.5, ``get_ptxas(arch) -> tool`` from 3.6."""
    from triton.backends.nvidia import compiler

    if not hasattr(compiler, "get_ptxas"):
        return compiler._path_to_binary("ptxas")[0]
    takes_arch = bool(inspect.signature(compiler.get_ptxas).parameters)
    found = compiler.get_ptxas(arch) if takes_arch else compiler.get_ptxas()
    return found[0] if isinstance(found, tuple) else found.path


def _run(*cmd: str) -> str:
    out = subprocess.run(list(cmd), check=True, capture_output=True, text=True)
    return out.stdout + out.stderr


def _tool(name: str, *args: str) -> str:
    return _run(os.path.join(BIN, name), *args)


def measure(spec: KernelSpec, arch: int) -> dict[str, int]:
    """Compile ``spec`` for ``sm_<arch>`` and read registers, spills, shared memory and tensor-core ops."""
    k = triton.compile(
        _source(spec),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        usage = _tool("cuobjdump", "-res-usage", cubin)
        sass = _tool("nvdisasm", cubin)
        ptxas = _run(_ptxas(arch), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "check.cubin"))
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    # Row offsets (row * D) of the [rows, D] and [V, D] operands are 64-bit: in the TTIR, every
    # pointer step over a [BLOCK, 1] column of pointers takes i64 offsets (the i32 steps add the
    # D-block columns, below D). Counted here so the test can insist on none narrow.
    narrow = len(re.findall(r"tt\.addptr [^\n]*tensor<\d+x1x!tt\.ptr<[^>]+>>, tensor<\d+x1xi32>", k.asm["ttir"]))
    # The same for scalar pointers and flat [BLOCK] pointer vectors: i32 offsets there are fine
    # below 2^31 elements (compact, select), but not in merge, whose S * N partials can pass it.
    narrow_1d = len(
        re.findall(
            r"tt\.addptr [^\n]*: (?:!tt\.ptr<[^>]+>|tensor<\d+x!tt\.ptr<[^>]+>>), (?:i32|tensor<\d+xi32>)",
            k.asm["ttir"],
        )
    )
    hgmma = len(re.findall(r"\bHGMMA\.", sass))
    hmma = len(re.findall(r"\bHMMA\.", sass))
    return {
        "regs": regs,
        "spill_bytes": max(spills, local),
        "smem_bytes": k.metadata.shared,
        "tensor_core_ops": hgmma + hmma,
        "hgmma": hgmma,
        "hmma": hmma,
        "narrow_row_offsets": narrow,
        "narrow_flat_offsets": narrow_1d,
    }


def line(spec: KernelSpec, arch: int, m: dict[str, int]) -> str:
    return (
        f"kernel={spec.name} arch=sm{arch} num_warps={spec.num_warps} num_stages={spec.num_stages} "
        f"regs={m['regs']} spill_bytes={m['spill_bytes']} smem_bytes={m['smem_bytes']} "
        f"tensor_core_ops={m['tensor_core_ops']}"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the report lines; with ``--json`` one JSON object per line instead, with the HGMMA and
    HMMA counts apart (what the test suite checks)."""
    parser = argparse.ArgumentParser(
        prog="python -m rho_fused.kernels.report",
        description=f"Compile every kernel offline for sm80 and sm90 at N={N} D={D} V={V} and print "
        "registers, spills, shared memory and tensor-core instruction counts (no GPU needed).",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line (HGMMA and HMMA apart)")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also fp16, fp32, and bias + softcap + per-token g + the loss variants (smoothing, softmax coefficient)",
    )
    args = parser.parse_args(argv)
    as_json = args.json
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; silences 3.9's notice
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the report compiles for real GPUs", file=sys.stderr)
        return 2
    if not as_json:
        print(f"# offline compile, N={N} D={D} V={V} {str(DTYPE).removeprefix('torch.')}, triton {triton.__version__}")
    runs = [(DTYPE, False)]
    if args.variants:  # the other input dtypes, and bias + softcap + d bias + per-token g
        runs += [(torch.float16, False), (torch.float32, False), (DTYPE, True), (torch.float16, True)]
    for dtype, extras in runs:
        name = str(dtype).removeprefix("torch.")
        if (dtype, extras) != (DTYPE, False) and not as_json:
            extra = ", bias + softcap + d bias + per-token g + smoothing + softmax coefficient" if extras else ""
            print(f"# variant: {name}{extra}")
        for spec in specs(dtype, extras):
            if (dtype, extras) != (DTYPE, False) and spec.name in ("compact", "select"):
                continue  # independent of the input dtype and of these options
            for arch in ARCHS:
                m = measure(spec, arch)
                if as_json:
                    row = {"kernel": spec.name, "arch": arch, "dtype": name, "extras": extras, **m}
                    print(json.dumps({**row, "num_warps": spec.num_warps}), flush=True)
                else:
                    print(line(spec, arch, m), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
