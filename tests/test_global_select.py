"""scope="global" over gloo processes against the reference on the concatenated batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import IGNORE, make_case
from global_variants import check_variants

import rho_fused
from rho_fused.global_select import key_to_float, order_keys

D, V = 16, 37


def test_order_keys_preserve_order():
    x = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.25, float("inf")])
    keys = order_keys(x)
    assert keys.tolist() == sorted(keys.tolist())
    assert keys[3] == keys[4]  # -0.0 and +0.0 are equal
    for value, key in zip(x.tolist(), keys, strict=True):
        assert key_to_float(key).item() == value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, sizes: list[int], backend: str, reduction: str, ties: bool, variants: bool
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Every rank builds the same global batch and takes its own slice of it.
        case = make_case((sum(sizes),), D, V, bias=True, ref="random", seed=5)
        targets, ref = case.targets.clone(), case.ref_loss.clone()
        if ties:  # zero hidden rows, two targets, no ref_loss: runs of equal excess across ranks
            case.hidden.detach().zero_()
            targets = torch.where(targets == IGNORE, IGNORE, 3 + 2 * (targets % 2))
            ref = None
        targets[sum(sizes[:-1]) :] = IGNORE  # the last rank has no valid token at all
        start = sum(sizes[:rank])
        own = slice(start, start + sizes[rank])
        hidden = case.hidden.detach()[own].clone().requires_grad_()
        weight = case.weight.detach().clone().requires_grad_()
        bias = case.bias.detach().clone().requires_grad_()
        upstream = case.upstream[own]
        loss, stats = rho_fused.fused_selective_loss(
            hidden, weight, targets[own], None if ref is None else ref[own], bias=bias, keep_ratio=0.45, scope="global",
            reduction=reduction, backend=backend, return_stats=True,
        )  # fmt: skip
        loss.backward(upstream if reduction == "none" else None)

        full_h = case.hidden.detach().clone().requires_grad_()
        full_w = case.weight.detach().clone().requires_grad_()
        full_b = case.bias.detach().clone().requires_grad_()
        expected, expected_stats = rho_fused.fused_selective_loss(
            full_h, full_w, targets, ref, bias=full_b, keep_ratio=0.45, reduction=reduction,
            backend="reference", return_stats=True,
        )  # fmt: skip
        expected.backward(case.upstream if reduction == "none" else None)

        assert torch.equal(stats.kept, expected_stats.kept[own])
        assert stats.n_kept == expected_stats.n_kept and stats.n_valid == expected_stats.n_valid
        assert stats.threshold == expected_stats.threshold
        if reduction == "none":
            torch.testing.assert_close(loss.detach(), expected.detach()[own])
        else:
            total = loss.detach().clone()
            dist.all_reduce(total)  # the sum over ranks is the global loss
            torch.testing.assert_close(total, expected.detach())
        torch.testing.assert_close(hidden.grad, full_h.grad[own])
        for mine, theirs in ((weight.grad, full_w.grad), (bias.grad, full_b.grad)):
            summed = mine.clone()
            dist.all_reduce(summed)  # shared weights: the global gradient is the sum over ranks
            torch.testing.assert_close(summed, theirs)
        if variants:  # the contract's variants in this scope too, in the same processes (a spawn is slow)
            check_variants(rank, sizes, backend)
        # leave together: a rank tearing its gloo group down while a peer is still in it can
        # abort the peer ("terminate called without an active exception", seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check above passed. Leave without the interpreter's finalisation, where gloo's worker
    # threads can abort the process (SIGABRT, "terminate called without an active exception"; seen
    # about once in four CI runs of this test, and pytorch#179291 describes the mechanism).
    os._exit(0)


@pytest.mark.parametrize(
    "sizes,backend,reduction,ties,variants",
    [
        ([23, 17], "chunked", "mean", False, False),
        ([11, 20, 9], "chunked", "none", False, True),
        ([11, 20, 9], "chunked", "mean", True, False),
        ([11, 20, 9], "reference", "sum", True, False),
    ],
)
def test_global_scope_matches_concatenated_batch(sizes, backend, reduction, ties, variants):
    """``variants``: also threshold, sampled and soft selection, token weights, several references,
    z-loss, label smoothing and lse (tests/global_variants.py), against the reference's global scope."""
    # A rank that raises makes start_processes raise here, with that rank's traceback.
    mp.start_processes(
        _worker,
        args=(len(sizes), _free_port(), sizes, backend, reduction, ties, variants),
        nprocs=len(sizes),
        start_method="spawn",
    )


def test_every_nan_ranks_above_inf():
    """Whatever its sign bit (x86 makes negative NaNs), a NaN sorts above +inf, as in torch.sort."""
    negative_nan = torch.tensor([0xFFC00000 - (1 << 32)], dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.tensor([float("inf"), float("nan"), 1.0]), negative_nan])
    keys = order_keys(x)
    assert keys[1] == keys[3] > keys[0] > keys[2]
