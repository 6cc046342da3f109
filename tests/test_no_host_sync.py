"""No host read in forward or backward, for every scope: counted at the ATen dispatcher.

A host read is an ATen op that needs a device value on the host (``.item()``, ``bool(t)``,
``t[idx]`` with a 0-dim tensor index, ``nonzero``, ...). Counting them with a `TorchDispatchMode`
sees those inside ATen too, which patching Python methods does not. The value checks of
`rho_fused.validation` read values by design and are switched off here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from cases import KERNEL_DEVICE, make_case
from torch.utils._python_dispatch import TorchDispatchMode

import rho_fused
from rho_fused import validation

HOST_READS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
    "aten::bincount",
    "aten::repeat_interleave",
}


class HostReads(TorchDispatchMode):
    """Records every ATen op that reads a device value back to the host, and every call of the
    Python methods that do (``.tolist()``, ``.numpy()``, ``.cpu()`` and ``.item()`` on a CPU
    tensor never reach the dispatcher)."""

    METHODS = ("tolist", "numpy", "cpu", "item")

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._recording(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _recording(self, name, method):
        def call(t, *args, **kwargs):
            self.seen.append(f"Tensor.{name}")
            return method(t, *args, **kwargs)

        return call

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_READS:
            self.seen.append(name)
        if name.startswith("rho_fused::"):
            # A custom operator's body runs ATen ops of its own: watch them too. The mode is off
            # inside this handler; redispatch to the device's kernel, past the Python key.
            self.ops.append(name)
            device = next(a for a in args if isinstance(a, torch.Tensor)).device
            backend = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(backend), *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_reads_inside_aten():
    t = torch.arange(5)
    with HostReads() as reads:
        t[t.sum() % 5]  # a 0-dim tensor index: read inside ATen
        t.nonzero()
    assert reads.seen.count("aten::_local_scalar_dense") == 1 and "aten::nonzero" in reads.seen


@contextlib.contextmanager
def one_process_group():
    """A gloo process group of one rank, for scope="global" in this process."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("scope", ["batch", "sequence", "global"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_forward_and_backward_read_nothing(monkeypatch, scope, reduction):
    monkeypatch.setattr(validation, "CHECK_VALUES", False)
    case = make_case((3, 11), 24, 97, seed=13, bias=True).on(KERNEL_DEVICE)
    group = one_process_group() if scope == "global" else contextlib.nullcontext()
    with group, HostReads() as reads:
        loss, stats = rho_fused.fused_selective_loss(
            case.hidden, case.weight, case.targets, case.ref_loss, bias=case.bias, reduction=reduction,
            scope=scope, backend="triton", return_stats=True,
        )  # fmt: skip
        loss.backward(case.upstream if reduction == "none" else None)
    assert reads.ops == ["rho_fused::triton_loss", "rho_fused::triton_loss_backward"], reads.ops
    assert reads.seen == [], f"host reads in the triton backend, scope={scope!r}: {reads.seen}"
    assert case.hidden.grad is not None and case.weight.grad is not None and case.bias.grad is not None
    assert int(stats.n_kept.sum()) == int(stats.kept.sum()) > 0


VARIANTS = {
    "threshold": dict(selection="threshold", threshold=0.5, z_loss=1e-2, label_smoothing=0.1),
    "sample": dict(selection="sample", keep_ratio=0.5, generator=3),
    "soft": dict(weighting="soft", temperature=0.5),
}


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("scope,variant", [("batch", "threshold"), ("sequence", "sample"), ("global", "soft")])
def test_triton_variants_read_nothing(monkeypatch, scope, variant):
    """The selection rules, weights, several references, z-loss, smoothing and lse's gradient: still
    no host read, forward or backward."""
    monkeypatch.setattr(validation, "CHECK_VALUES", False)
    case = make_case((3, 11), 24, 97, seed=17, bias=True).on(KERNEL_DEVICE)
    options = dict(VARIANTS[variant])
    if "generator" in options:
        options["generator"] = torch.Generator(device=KERNEL_DEVICE).manual_seed(options["generator"])
    refs = torch.stack([case.ref_loss, case.ref_loss * 0.5])  # two references
    weights = torch.rand(3, 11, device=KERNEL_DEVICE)
    group = one_process_group() if scope == "global" else contextlib.nullcontext()
    with group, HostReads() as reads:
        loss, lse, stats = rho_fused.fused_selective_loss(
            case.hidden, case.weight, case.targets, refs, bias=case.bias, scope=scope, backend="triton",
            token_weights=weights, ref_reduce="min", return_lse=True, return_stats=True, **options,
        )  # fmt: skip
        torch.autograd.backward([loss, lse], [torch.ones_like(loss), case.upstream])
    assert reads.ops == ["rho_fused::triton_loss", "rho_fused::triton_loss_backward"], reads.ops
    assert reads.seen == [], f"host reads in the triton backend, {variant}, scope={scope!r}: {reads.seen}"
    assert case.hidden.grad is not None and case.weight.grad is not None


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("check_values", [True, False])
def test_value_checks_are_the_only_reads(monkeypatch, check_values):
    """With the value checks on, the call reads (theirs); with them off, it reads nothing."""
    monkeypatch.setattr(validation, "CHECK_VALUES", check_values)
    case = make_case((2, 7), 16, 33, seed=3).on(KERNEL_DEVICE)
    with HostReads() as reads:
        rho_fused.fused_selective_loss(case.hidden, case.weight, case.targets, case.ref_loss, backend="triton")
    assert bool(reads.seen) == check_values, reads.seen


def test_the_counter_sees_python_reads():
    t = torch.arange(5.0)
    with HostReads() as reads:
        t.sum().tolist()
        t.numpy()
    assert reads.seen == ["Tensor.tolist", "Tensor.numpy"]
