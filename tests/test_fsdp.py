"""FSDP2 (`rho_fused.fsdp`) over 2 gloo processes on CPU against one process.

One sharded step equals the one-process step on the same global batch (tied and untied LM heads,
``scope="global"``); each rank holds half the parameter bytes; a DTensor LM head passed to the
loss directly is refused; `SelectiveTrainer`'s loss path runs through a model sharded as
accelerate's FSDP2 plugin shards it (the plugin itself needs GPUs); `train(fsdp=True)` resumed from
a sharded checkpoint is bit-identical to an uninterrupted run; ``rho-fused train --fsdp`` under
torchrun equals the one-process run.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pipeline_fixtures import one_thread, random_rows, reference_workdir, tiny_llama
from test_torchrun import score_argv, torchrun, train_argv

from rho_fused import fsdp, fused_selective_loss
from rho_fused.cli import main
from rho_fused.data import pad_batch
from rho_fused.hf import causal_lm_loss, kept_count
from rho_fused.train_loop import SelectiveObjective, TrainConfig, train

VOCAB, KEEP = 50, 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_grads(tied: bool, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of the kept tokens' mean over the whole batch, unsharded, one process."""
    model = tiny_llama(VOCAB, seed=1, tie_word_embeddings=tied)
    loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                          ref_loss=batch["ref_loss"], keep_ratio=KEEP, reduction="sum", backend="chunked")  # fmt: skip
    (loss / kept_count(batch["labels"], KEEP)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _check_step(rank: int, world: int, tied: bool) -> None:
    """One sharded forward/backward/SGD step of `SelectiveObjective` against the one-process step."""
    batch = pad_batch(random_rows(4, VOCAB, lengths=(4, 15), seed=5))
    own = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    expected = _one_process_grads(tied, batch)
    model = tiny_llama(VOCAB, seed=1, tie_word_embeddings=tied)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = fsdp.local_bytes(model)
    objective = SelectiveObjective(model, keep_ratio=KEEP, scope="global", backend="chunked")
    fsdp.shard(objective, model)
    assert fsdp.is_sharded(objective) and all(fsdp.is_sharded(m) for m in model.model.layers)
    assert fsdp.local_bytes(model) * world == total  # every dim 0 here divides by 2: exactly half each
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied

    # the LM head outside the root's forward is a DTensor: a clear error, not a crash or a wrong loss
    with pytest.raises(TypeError, match=r"weight must be a plain torch.Tensor, got a DTensor.*inside that forward"):
        fused_selective_loss(torch.randn(3, 32), model.lm_head.weight, torch.tensor([1, 2, 3]), keep_ratio=1.0)
    with pytest.raises(TypeError, match=r"weight must be a plain torch.Tensor, got a DTensor"):
        causal_lm_loss(model, own["input_ids"], own["labels"])  # the sharded model's loss, outside its forward

    loss, stats = objective(own["input_ids"], own["labels"], own["attention_mask"], own["ref_loss"])
    n_keep = kept_count(batch["labels"], KEEP)
    assert int(stats.kept.sum()) < n_keep  # this rank's share of a global selection
    (loss * world / n_keep).backward()  # FSDP averages over ranks, as DDP does
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    sgd.step()
    for name, p in model.named_parameters():
        grad = fsdp.full_value(p.grad)
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(fsdp.full_value(p.detach()), before[name] - expected[name], rtol=0, atol=1e-5)
    copy = fsdp.plain_copy(model)  # what `rho-fused train --fsdp` saves: whole, unsharded, on rank 0
    if rank == 0:
        assert (copy.lm_head.weight is copy.model.embed_tokens.weight) == tied
        for name, p in copy.named_parameters():
            assert type(p) is torch.nn.Parameter
            torch.testing.assert_close(p.detach(), before[name] - expected[name], rtol=0, atol=1e-5)
    else:
        assert copy is None


def _check_bf16_policy(rank: int, world: int) -> None:
    """The GPU policy, run here on CPU: bf16 weights in the loss, ref_loss kept fp32, fp32 sharded gradients."""
    from rho_fused import train_loop

    batch = pad_batch(random_rows(4, VOCAB, lengths=(4, 15), seed=8))
    own = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    expected = _one_process_grads(False, batch)
    model = tiny_llama(VOCAB, seed=1)
    objective = SelectiveObjective(model, keep_ratio=KEEP, scope="global", backend="chunked")
    fsdp.shard(objective, model, bf16=True)
    seen = {}

    def spy(m, input_ids, labels, *, ref_loss, **kwargs):
        seen.update(head=m.lm_head.weight.dtype, ref_loss=ref_loss.dtype)
        return causal_lm_loss(m, input_ids, labels, ref_loss=ref_loss, **kwargs)

    train_loop.causal_lm_loss, original = spy, train_loop.causal_lm_loss
    try:
        loss, _ = objective(own["input_ids"], own["labels"], own["attention_mask"], own["ref_loss"])
    finally:
        train_loop.causal_lm_loss = original
    assert seen == {"head": torch.bfloat16, "ref_loss": torch.float32}
    (loss * world / kept_count(batch["labels"], KEEP)).backward()
    grads = {n: fsdp.full_value(p.grad) for n, p in model.named_parameters()}
    assert {g.dtype for g in grads.values()} == {torch.float32}
    # bf16 compute against the fp32 step: the gradient's direction and size, to bf16's ~1% rounding
    flat = torch.cat([grads[n].flatten() for n in expected])
    truth = torch.cat([g.flatten() for g in expected.values()])
    print(f"bf16 policy: relative gradient error {float((flat - truth).norm() / truth.norm()):.3g}")
    assert float((flat - truth).norm() / truth.norm()) < 0.02


def _check_trainer_path(rank: int, world: int, tmp: Path) -> None:
    """`SelectiveTrainer.compute_loss` on a model sharded as accelerate's FSDP2 plugin does (layers, then the model)."""
    import datasets
    from transformers import TrainingArguments

    from rho_fused.hf_trainer import SelectiveTrainer

    rows = random_rows(4, VOCAB, lengths=(4, 15), seed=6)
    batch = pad_batch(rows)
    expected = _one_process_grads(False, batch)
    model = tiny_llama(VOCAB, seed=1)
    fsdp.shard(model, model)
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    args = TrainingArguments(output_dir=str(tmp / "trainer"), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=ds, keep_ratio=KEEP, scope="global",
                               backend="chunked")  # fmt: skip
    own = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    model.train()
    trainer.compute_loss(model, own).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fsdp.full_value(p.grad), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def _check_resume(rank: int, tmp: Path) -> None:
    """`train(fsdp=True)`: stopped after step 1 and resumed from its sharded checkpoint = 3 steps in one go."""
    data = random_rows(12, VOCAB, lengths=(4, 15), seed=7)
    cfg = TrainConfig(steps=3, batch_size=4, accum_steps=2, lr=3e-3, warmup_steps=1, keep_ratio=KEEP, seed=2,
                      backend="chunked", log_every=1, fsdp=True)  # fmt: skip
    results = []
    for run, stops in (("whole", [None]), ("resumed", [1, None])):
        for i, stop in enumerate(stops):
            model = tiny_llama(VOCAB, seed=4)
            history = train(model, data, cfg, out_dir=tmp / run, eval_data=data[:5], resume=i > 0, stop_at=stop,
                            progress=False)  # fmt: skip
        results.append((history, fsdp.full_state_dict(model)))
    (h1, w1), (h2, w2) = results
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [1, 2, 3]
    timeless = [[{k: v for k, v in h.items() if k != "tok_per_s"} for h in hist] for hist in (h1, h2)]
    assert timeless[0] == timeless[1] and "eval_loss" in h1[-1]
    if rank == 0:
        assert w1.keys() == w2.keys()
        for k in w1:
            assert torch.equal(w1[k], w2[k]), k
        assert list((tmp / "resumed" / "checkpoint").glob("*.distcp"))  # sharded: one file per rank


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_step(rank, world, tied=False)
        _check_step(rank, world, tied=True)
        _check_bf16_policy(rank, world)
        _check_trainer_path(rank, world, Path(tmp))
        _check_resume(rank, Path(tmp))
        dist.barrier()  # leave together (see tests/test_global_select.py)
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_fsdp_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    # A rank that raises makes start_processes raise here, with that rank's traceback.
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")


def test_mixed_precision_policy() -> None:
    gpu, root, cpu = (fsdp.mixed_precision_policy(True), fsdp.mixed_precision_policy(True, root=True),
                      fsdp.mixed_precision_policy(False))  # fmt: skip
    assert (gpu.param_dtype, gpu.reduce_dtype, gpu.cast_forward_inputs) == (torch.bfloat16, torch.float32, True)
    assert (root.param_dtype, root.reduce_dtype, root.cast_forward_inputs) == (torch.bfloat16, torch.float32, False)
    assert cpu.param_dtype is None and cpu.reduce_dtype is None


def test_fsdp_needs_a_process_group() -> None:
    model = tiny_llama(VOCAB)
    with pytest.raises(ValueError, match="torchrun"):
        fsdp.shard(model, model)


def test_torchrun_train_fsdp_equals_one_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``rho-fused train --fsdp`` on 2 processes: the weights and the log of the 1-process (unsharded) run."""
    from safetensors.torch import load_file

    root = reference_workdir(tmp_path)
    with one_thread():
        assert main(score_argv(root, "scored1")) == 0
        assert main(train_argv(root, "train1")) == 0
        capsys.readouterr()
        assert main(train_argv(root, "train0", "--fsdp")) == 2  # no process group: refused in one line
        err = capsys.readouterr().err.strip()
        assert err.startswith("rho-fused train: error: fsdp=True (--fsdp)") and "torchrun" in err and "\n" not in err
    proc = torchrun(2, train_argv(root, "train2", "--fsdp"))
    assert proc.stdout.count("trained ") == 1
    h1 = json.loads((root / "train1" / "history.json").read_text())
    h2 = json.loads((root / "train2" / "history.json").read_text())
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [1, 2, 3, 4]
    for a, b in zip(h1, h2, strict=True):
        assert a["kept"] == b["kept"]
        for key in ("grad_norm", "loss", "loss_all", "threshold", "eval_loss"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    w1 = load_file(root / "train1" / "model" / "model.safetensors")
    w2 = load_file(root / "train2" / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"max |w(1 process) - w(2 processes, FSDP)| = {diff:.3g}")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5, msg=k)
    ckpt = root / "train2" / "checkpoint"
    assert len(list(ckpt.glob("*.distcp"))) == 2 and torch.load(ckpt / "state.pt", weights_only=False)["sharded"]
