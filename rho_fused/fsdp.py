"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for `rho-fused train --fsdp` and `SelectiveTrainer`.

Sharding: every decoder layer is one FSDP group and the root (the module whose ``forward`` computes
the loss, e.g. `rho_fused.train_loop.SelectiveObjective`) holds the rest: embeddings, final norm
and the LM head, tied or not. Each parameter is cut along dim 0 over the ranks (``torch.chunk``),
so a rank of ``W`` holds ``1/W`` of the parameters, of their gradients and of the optimizer state.

Why the loss runs inside the root's forward: FSDP all-gathers a group's parameters in a forward
pre-hook and turns them back into sharded DTensors after forward or backward. The fused loss reads
``lm_head.weight`` directly (it never calls the head module), so it sees the whole ``[V, D]`` weight
only between the root's pre-forward and post-forward hooks, and the gradient it leaves there is the
one FSDP reduce-scatters into the sharded weight. A call from outside (the weight still a DTensor)
is refused by `rho_fused.validation.make_problem` with a message pointing here.

On CUDA the policy is bf16 parameters for compute and fp32 gradient reduction; the sharded master
weights and the optimizer state stay fp32. Checkpoints are sharded: each rank writes its own pieces
through `torch.distributed.checkpoint` (DCP), with the run state beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .atomic import atomic_dir, recover
from .data import pad_batch
from .hf import causal_lm_loss, model_body, valid_count
from .ranks import barrier, from_rank_zero, rank_and_world, sum_over_ranks

STATE = "state.pt"  # the run state beside the DCP shards: step, history, config, RNG


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` (its class is then an `FSDPModule`)."""
    return isinstance(module, FSDPModule)


def mixed_precision_policy(bf16: bool, *, root: bool = False) -> MixedPrecisionPolicy:
    """With ``bf16``, bf16 parameters for compute and fp32 gradient reduction; else the parameters' own dtype.

    The root does not cast its floating-point inputs: ``ref_loss`` enters there and must stay fp32
    (the layers' inputs are activations, cast to bf16 as usual).
    """
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=not root)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM: the modules of a class in ``_no_split_modules``.

    That list is the transformers convention (accelerate's FSDP auto-wrap reads it too); a model
    without it falls back to its body's ``layers`` (or GPT-2's ``h``) ModuleList.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        body = model_body(model)
        blocks = getattr(body, "layers", None) or getattr(body, "h", None)
        layers = list(blocks) if isinstance(blocks, nn.ModuleList) else []
    if not layers:
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__} to shard (no _no_split_modules)")
    return layers


def shard(root: nn.Module, model: nn.Module, *, bf16: bool | None = None) -> nn.Module:
    """Apply ``fully_shard`` to each decoder layer of ``model``, then to ``root``; return ``root``.

    ``root`` contains ``model`` and computes the loss in its ``forward`` (or is ``model`` itself,
    with the loss run as its forward by `forward_through`). Every rank first takes rank 0's weights
    (as DDP does), so a model initialised differently on each rank still starts as one. The
    parameters become DTensors: build the optimizer after this call. ``bf16`` (default: on CUDA)
    selects the mixed-precision policy of `mixed_precision_policy`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("FSDP shards over the ranks of a process group: launch with torchrun (torch.distributed)")
    from torch.distributed.device_mesh import init_device_mesh

    device_type = next(model.parameters()).device.type
    bf16 = device_type == "cuda" if bf16 is None else bf16
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mixed_precision_policy(bf16))
    fully_shard(root, mesh=mesh, mp_policy=mixed_precision_policy(bf16, root=True))
    return root


def forward_through(module: nn.Module, fn: Callable[[], Any]) -> Any:
    """``fn()`` run as ``module``'s forward, so that its hooks (FSDP's all-gather, DDP's) run around it.

    ``module.forward`` is replaced for one call of ``module`` (its own ``__call__``, hooks included),
    then restored.
    """
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")
    module.forward = lambda *args, **kwargs: fn()
    try:
        return module()
    finally:
        if had_own:
            module.forward = own
        else:
            del module.forward


@contextlib.contextmanager
def gradient_sync_off(net: nn.Module) -> Iterator[None]:
    """No gradient reduction in the backward passes of this block (accumulation): FSDP's or DDP's."""
    if not is_sharded(net):
        with net.no_sync():
            yield
        return
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def full_value(t: Tensor) -> Tensor:
    """A DTensor's whole value (a collective: every rank must call); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_bytes(module: nn.Module) -> int:
    """Bytes of the parameters this rank holds: its shards for DTensors, whole tensors otherwise."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` whole, on the CPU, on rank 0 (``{}`` on the others).

    A collective: every rank calls, in the same order; each tensor is all-gathered in turn.
    """
    rank = rank_and_world()[0]
    out = {}
    for name, t in model.state_dict().items():
        whole = full_value(t).detach()
        if rank == 0:
            out[name] = whole.to("cpu", copy=True)
    return out


def plain_copy(model: nn.Module) -> nn.Module | None:
    """On rank 0, an unsharded copy of a Hugging Face ``model`` on the CPU (for ``save_pretrained``); None elsewhere.

    A collective (`full_state_dict`). The copy is built from ``model.config`` and loaded strictly.
    """
    weights = full_state_dict(model)
    if rank_and_world()[0] != 0:
        return None
    copy = type(model)(model.config)
    copy.load_state_dict(weights)
    return copy


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A sharded checkpoint at ``path``: each rank's model and optimizer shards (DCP), and the run state.

    Every rank calls. Rank 0 writes ``state`` (with its RNG) and swaps the directory into place
    atomically once every rank has written; the others wait for it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)

    def write(tmp: Path) -> None:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
        if rank_and_world()[0] == 0:
            torch.save({"rng": torch.get_rng_state(), "sharded": True, **state}, tmp / STATE)
        barrier()

    if rank_and_world()[0] == 0:
        with atomic_dir(path) as tmp:
            from_rank_zero(str(tmp))
            write(tmp)
    else:
        write(Path(from_rank_zero(None)))
    barrier()  # the checkpoint is in place before any rank goes on


def load_checkpoint(
    path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any
) -> tuple[int, list[dict[str, float]]]:
    """Restore a sharded checkpoint into a sharded ``model`` and its ``optimizer``; return ``(step, history)``.

    Every rank calls. Refused unless it was written by `save_checkpoint` with ``cfg`` (the fields
    of ``cfg.RESUMABLE`` aside). DCP reshards on load, so the world size may differ from the run's.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if path is not None and rank_and_world()[0] == 0:
        recover(path)  # a run killed while replacing its checkpoint left the previous one aside
    barrier()
    if path is None or not (path / STATE).is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state = torch.load(path / STATE, weights_only=False)
    if not state.get("sharded"):
        raise ValueError(f"cannot resume {path} with --fsdp: it is an unsharded checkpoint (resume without --fsdp)")
    skip = set(getattr(cfg, "RESUMABLE", ()))
    saved = {k: v for k, v in state["config"].items() if k not in skip}
    wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    if saved != wanted:
        diff = {k: (saved.get(k), wanted.get(k)) for k in wanted if saved.get(k) != wanted.get(k)}
        raise ValueError(f"cannot resume {path}: the config differs (saved, given): {diff}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["history"]


@torch.no_grad()
def evaluate(
    net: nn.Module, model: nn.Module, rows: Sequence[Any], *, batch_size: int = 16, backend: str = "auto"
) -> float:
    """Mean cross-entropy per predicted token of ``rows``, through the sharded root ``net`` around ``model``.

    As `rho_fused.train_loop.evaluate` (batch ``j`` on rank ``j % world``, sums all-reduced), except
    that every rank runs the same number of forwards: FSDP's all-gathers are collectives, so a rank
    with no batch left runs its first one again and adds nothing.
    """
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_batches = math.ceil(len(rows) / batch_size)
    total, count = 0.0, 0
    for j in range(math.ceil(n_batches / world)):
        index = j * world + rank
        real = index < n_batches
        start = (index if real else rank % max(n_batches, 1)) * batch_size
        b = pad_batch([rows[i] for i in range(start, min(start + batch_size, len(rows)))], with_ref_loss=False)
        b = {k: v.to(device) for k, v in b.items()}

        def loss_fn(b: dict[str, Tensor] = b) -> Tensor:
            return causal_lm_loss(
                model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"], reduction="sum", backend=backend
            )

        loss = forward_through(net, loss_fn)
        if real:
            total += float(loss)
            count += valid_count(b["labels"])
    model.train(was_training)
    total, count = sum_over_ranks([total, count], device)
    return total / max(count, 1)
