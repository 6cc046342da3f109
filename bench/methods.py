"""The methods the benchmark compares, each as one training step's loss over the same inputs.

Two tasks: ``slm`` (Rho-1 selective loss: keep the ``keep_ratio`` tokens of largest excess loss,
mean cross-entropy over them) and ``ce`` (plain mean cross-entropy of an LM head). A method is a
function ``loss(inputs, task) -> Tensor``; the harness calls ``.backward()`` on what it returns.
Peers that cannot compute the selection themselves get it the way a user would write it: their
per-token losses (``reduction="none"``), a top-k mask on ``ce - ref_loss``, the mean over kept.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TASKS = ("slm", "ce")


# Standard deviation of the benchmark's logits. A trained LM head's logits spread about this much;
# ``N(0, 1)`` logits give a near-flat softmax, unlike training, and flatter peers that skip blocks of
# near-zero gradient (CCE's filtering).
LOGIT_STD = 3.0


@dataclass
class Inputs:
    """One benchmark shape's tensors: ``hidden [N, D]`` and ``weight [V, D]`` require grad."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    ref_loss: Tensor
    keep_ratio: float

    @classmethod
    def make(
        cls,
        n: int,
        d: int,
        v: int,
        keep_ratio: float = 0.6,
        device: str = "cpu",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Inputs:
        """Random inputs whose logits ``z = hidden @ weight.T`` have standard deviation `LOGIT_STD`.

        ``hidden ~ N(0, 1)`` and ``weight ~ N(0, LOGIT_STD^2 / D)`` give ``z ~ N(0, LOGIT_STD^2)``.
        The cross-entropy of such logits is about ``log V + LOGIT_STD^2 / 2`` (the log of
        ``V * E[exp z]``), so the reference loss is drawn around that value, with spread 0.5: the
        excess loss then has both signs. Drawn on ``device`` (fast on a GPU), then cast to ``dtype``.
        """
        g = torch.Generator(device=device).manual_seed(seed)
        hidden = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_()
        weight = (torch.randn(v, d, generator=g, device=device) * (LOGIT_STD / math.sqrt(d))).to(dtype)
        targets = torch.randint(0, v, (n,), generator=g, device=device)
        center = math.log(v) + LOGIT_STD**2 / 2
        ref_loss = center + 0.5 * torch.randn(n, generator=g, device=device)
        return cls(hidden, weight.requires_grad_(), targets, ref_loss, keep_ratio)

    def zero_grad(self) -> None:
        """Drop the gradients so that each step allocates its own, as after ``zero_grad()``."""
        self.hidden.grad = None
        self.weight.grad = None


def top_k_mean(ce: Tensor, x: Inputs) -> Tensor:
    """SLM written by hand over per-token losses: top-k of ``ce - ref_loss``, mean ``ce`` over kept."""
    n_keep = max(1, math.ceil(x.keep_ratio * ce.shape[0]))
    kept = torch.zeros_like(ce, dtype=torch.bool)
    kept[torch.topk(ce.detach() - x.ref_loss, n_keep, sorted=False).indices] = True
    return torch.where(kept, ce, torch.zeros_like(ce)).sum() / n_keep


def naive(x: Inputs, task: str) -> Tensor:
    """What users write today: full logits, ``F.cross_entropy``, a top-k mask."""
    logits = F.linear(x.hidden, x.weight)
    if task == "ce":
        return F.cross_entropy(logits, x.targets)
    return top_k_mean(F.cross_entropy(logits, x.targets, reduction="none"), x)


# Rows per chunk for torch's linear_cross_entropy. Its default options on CPU fp32 (policy
# "compact", chunks from "aspect_ratio:2") give 8 to 128 rows at these shapes and ran 3-7x
# slower than with 512 rows here (bench/NOTES.md), so the comparison gives it 512.
TORCH_LCE_CHUNK_ROWS = 512


def torch_lce(x: Inputs, task: str) -> Tensor:
    """``torch.nn.functional.linear_cross_entropy``, chunked path: ``TORCH_LCE_CHUNK_ROWS`` rows per chunk
    on CPU, torch's own default chunking on CUDA."""
    if x.hidden.is_cuda:
        options = torch.nn.LinearCrossEntropyOptions()
    else:
        options = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=TORCH_LCE_CHUNK_ROWS)
    if task == "ce":
        return F.linear_cross_entropy(x.hidden, x.weight, x.targets, options=options)
    return top_k_mean(F.linear_cross_entropy(x.hidden, x.weight, x.targets, reduction="none", options=options), x)


def cut_cross_entropy(x: Inputs, task: str) -> Tensor:
    """apple/ml-cross-entropy: ``impl="cce"`` (Triton) on CUDA, ``"torch_compile"`` elsewhere."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if x.hidden.is_cuda else "torch_compile"
    if task == "ce":
        return linear_cross_entropy(x.hidden, x.weight, x.targets, impl=impl)
    return top_k_mean(linear_cross_entropy(x.hidden, x.weight, x.targets, impl=impl, reduction="none"), x)


def cut_cross_entropy_exact(x: Inputs, task: str) -> Tensor:
    """apple/ml-cross-entropy without gradient filtering (CUDA): ``impl="cce_exact"`` where the version
    has it, else ``impl="cce", filter_eps=None`` (25.1.1 on PyPI has no ``cce_exact``)."""
    import importlib

    from cut_cross_entropy import linear_cross_entropy

    # import_module: the package's attribute of that name is the function, not the module
    impls = importlib.import_module("cut_cross_entropy.linear_cross_entropy").LinearCrossEntropyImpl
    if hasattr(impls, "CCE_EXACT"):
        options: dict = {"impl": "cce_exact"}
    else:
        options = {"impl": "cce", "filter_eps": None}
    if task == "ce":
        return linear_cross_entropy(x.hidden, x.weight, x.targets, **options)
    return top_k_mean(linear_cross_entropy(x.hidden, x.weight, x.targets, reduction="none", **options), x)


def liger(x: Inputs, task: str) -> Tensor:
    """linkedin/Liger-Kernel's fused linear cross-entropy (Triton, CUDA only).

    Timed as a peer only: it forms gradients in its forward, and for ``reduction="none"`` some
    versions do not honour a per-token upstream gradient, so its SLM gradients may be wrong.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def per_token_or_mean(reduction: str) -> Tensor:
        out = liger_fused_linear_cross_entropy(x.hidden, x.weight, x.targets, reduction=reduction)
        return out[0] if isinstance(out, tuple) else out  # (loss, z_loss) in some versions

    return per_token_or_mean("mean") if task == "ce" else top_k_mean(per_token_or_mean("none"), x)


def rho_fused(x: Inputs, task: str) -> Tensor:
    """This package: ``backend="auto"`` (``chunked`` on CPU, ``triton`` on CUDA)."""
    import rho_fused as rf

    if task == "ce":
        return rf.linear_cross_entropy(x.hidden, x.weight, x.targets)
    return rf.fused_selective_loss(x.hidden, x.weight, x.targets, x.ref_loss, keep_ratio=x.keep_ratio)


METHODS: dict[str, Callable[[Inputs, str], Tensor]] = {
    "naive": naive,
    "torch_lce": torch_lce,
    "cce": cut_cross_entropy,
    "cce_exact": cut_cross_entropy_exact,
    "liger": liger,
    "rho_fused": rho_fused,
}


def available(device: str) -> list[str]:
    """The methods that run on ``device`` with what is installed."""
    names = ["naive"]
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        names.append("torch_lce")
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        names += ["cce", "cce_exact"] if device == "cuda" else ["cce"]
    if device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    names.append("rho_fused")
    return names


def step(method: str, x: Inputs, task: str) -> None:
    """One training step's loss work: forward and backward, gradients into ``x``."""
    x.zero_grad()
    METHODS[method](x, task).backward()
