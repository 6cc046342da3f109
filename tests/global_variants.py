"""The contract's variants with scope="global", checked inside each rank of a gloo group (shared by
test_global_select.py for chunked and test_triton_global.py for triton).

Every rank runs the backend and the reference backend, both with ``scope="global"``, on its own
slice of one global batch, and compares: kept tokens, counts, weight sums, loss (and ``lse``) and
the gradients of its own inputs. Where the selection does not sample, the global result is also
the one of the concatenated batch with ``scope="batch"``: the losses summed over ranks, the kept
tokens and ``d hidden`` sliced, ``d weight`` summed over ranks. (A sampled selection draws ``U``
per rank, from each rank's generator, so it has no single-process twin.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from cases import IGNORE, make_case

import rho_fused

VARIANTS = [
    dict(selection="threshold", threshold=0.25, reduction="mean", weights=True),
    dict(selection="sample", keep_ratio=0.45, reduction="sum", z_loss=1e-2),
    dict(weighting="soft", temperature=0.5, reduction="mean", label_smoothing=0.1, weights=True),
    dict(ref_reduce="max", keep_ratio=0.45, reduction="none", z_loss=1e-3, label_smoothing=0.2, return_lse=True),
]


def _call(backend: str, hidden, weight, targets, ref, scope: str, rank_seed: int, options: dict):
    options = dict(options)
    if options.get("selection") == "sample":
        options["generator"] = torch.Generator(device=hidden.device).manual_seed(rank_seed)
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    out = rho_fused.fused_selective_loss(
        leaves[0], leaves[1], targets, ref, scope=scope, backend=backend, return_stats=True, **options
    )
    outputs, stats = list(out[:-1]), out[-1]
    n = targets.numel()
    loss = outputs[0]
    upstream = [
        torch.linspace(-1, 1, n, device=hidden.device).reshape(loss.shape) if loss.dim() else torch.ones_like(loss)
    ]
    if len(outputs) > 1:
        upstream.append(torch.linspace(1, 2, n, device=hidden.device).reshape(targets.shape))
    grads = torch.autograd.grad(outputs, leaves, upstream)
    return [o.detach().cpu() for o in outputs], [g.cpu() for g in grads], stats


def check_variants(rank: int, sizes: list[int], backend: str, device: str = "cpu") -> None:
    """Run every variant of `VARIANTS` on this rank; raise on the first mismatch."""
    world = len(sizes)
    for index, variant in enumerate(VARIANTS):
        options = {k: v for k, v in variant.items() if k != "weights"}
        case = make_case((sum(sizes),), 16, 37, bias=False, seed=40 + index)  # spaced excess
        targets = case.targets.clone()
        targets[sum(sizes[:-1]) :] = IGNORE  # the last rank has no valid token
        ref = case.ref_loss + torch.rand(3, sum(sizes), generator=torch.Generator().manual_seed(index)) * 0.2
        if variant.get("weights"):
            gen = torch.Generator().manual_seed(100 + index)
            options["token_weights"] = torch.rand(sum(sizes), generator=gen) * 2
        own = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        mine = dict(options)
        if "token_weights" in mine:
            mine["token_weights"] = mine["token_weights"][own].to(device)
        hidden, weight = case.hidden.detach(), case.weight.detach()
        args = (hidden[own].to(device), weight.to(device), targets[own].to(device), ref[:, own].to(device))
        out, grads, stats = _call(backend, *args, "global", 1000 + rank, mine)
        ref_args = tuple(a.cpu() for a in args)
        ref_out, ref_grads, ref_stats = _call("reference", *ref_args, "global", 1000 + rank, mine)

        where = f"rank {rank}, variant {variant}"
        assert torch.equal(stats.kept.cpu(), ref_stats.kept), where
        assert stats.n_kept.item() == ref_stats.n_kept.item() and stats.n_valid.item() == ref_stats.n_valid.item()
        torch.testing.assert_close(stats.weight_sum.cpu().float(), ref_stats.weight_sum.float(), msg=where)
        for a, b in zip(out + grads, ref_out + ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
        if variant.get("selection") == "sample":
            continue
        full_out, full_grads, full_stats = _call("reference", hidden, weight, targets, ref, "batch", 0, options)
        assert torch.equal(stats.kept.cpu(), full_stats.kept[own]), where
        if options["reduction"] == "none":
            torch.testing.assert_close(out[0], full_out[0][own], msg=where)
        else:
            total = out[0].clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, full_out[0], msg=where)
        if len(out) > 1:
            torch.testing.assert_close(out[1], full_out[1][own], msg=where)
        # gradients against the concatenated batch's where the upstream is the same there: a scalar loss
        if options["reduction"] != "none" and len(out) == 1:
            torch.testing.assert_close(grads[0], full_grads[0][own], rtol=1e-4, atol=1e-5, msg=where)
            summed = grads[1].clone()
            dist.all_reduce(summed)
            torch.testing.assert_close(summed, full_grads[1], rtol=1e-4, atol=1e-5, msg=where)
    assert world == dist.get_world_size()
