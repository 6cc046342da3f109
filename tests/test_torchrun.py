"""`rho-fused score` and `rho-fused train` under torchrun with 2 CPU processes (gloo) against 1 process.

Scoring: the 2-process output is byte for byte the 1-process one. Training with keep_ratio < 1:
the same global batch each step, split over the ranks, must give the same selection (global, not
per rank), the same summed gradient (the loss scaled by `rho_fused.ranks.ddp_sum_factor`) and so
the same weights. The per-step log is compared too: ``grad_norm`` (before clipping) would be off
by the world size if the scaling were wrong, where AdamW alone would hide it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import one_thread, reference_workdir, tiny_llama

from rho_fused.cli import main
from rho_fused.scoring import load_scored

SEQ_LEN = 24


def torchrun(nproc: int, argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m rho_fused ARGV`` on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "rho_fused", *argv]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny reference model (also the config trained from) with its tokenizer, and a text corpus."""
    return reference_workdir(tmp_path_factory.mktemp("torchrun"))


def score_argv(root: Path, out: str) -> list[str]:
    return ["score", "--ref-model", str(root / "ref"), "--corpus", str(root / "corpus.jsonl"), "--out", str(root / out),
            "--seq-len", str(SEQ_LEN), "--batch-size", "3", "--docs-per-block", "4", "--shard-tokens", "144",
            "--no-progress"]  # fmt: skip


def train_argv(root: Path, out: str, *extra: str) -> list[str]:
    """5 rows a micro-batch (shards of 2 and 3 rows), 2 micro-batches a step, keep 60%, clipping, evaluation."""
    return ["train", "--data", str(root / "scored1"), "--config", str(root / "ref"), "--out", str(root / out),
            "--steps", "4", "--batch-size", "5", "--accum-steps", "2", "--warmup-steps", "1", "--lr", "3e-3",
            "--keep-ratio", "0.6", "--grad-clip", "1.0", "--seed", "1", "--log-every", "1", "--checkpoint-every", "1",
            "--eval-data", str(root / "scored1"), "--eval-every", "2", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def scored(workdir: Path) -> Path:
    """The corpus scored by one process (in this process, one thread, as each torchrun worker)."""
    with one_thread():
        assert main(score_argv(workdir, "scored1")) == 0
    return workdir / "scored1"


def test_torchrun_score_equals_one_process(workdir: Path, scored: Path) -> None:
    proc = torchrun(2, score_argv(workdir, "scored2"))
    assert proc.stdout.count("scored ") == 1  # rank 0 alone prints
    one, two = scored, workdir / "scored2"
    meta = json.loads((one / "rho_fused.json").read_text())
    assert meta == json.loads((two / "rho_fused.json").read_text())
    # each rank wrote the shards of its blocks; the files are the same, name for name and byte for byte
    assert len(meta["shards"]) > 2
    files = sorted(p.name for p in one.glob("shard-*.arrow"))
    assert files == sorted(p.name for p in two.glob("shard-*.arrow")) == [s["file"] for s in meta["shards"]]
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = load_scored(one)[0], load_scored(two)[0]
    assert len(a) == len(b) == meta["n_sequences"] > 6
    for ra, rb in zip(a, b, strict=True):
        assert np.array_equal(ra["input_ids"], rb["input_ids"])
        assert np.array_equal(ra["ref_loss"], rb["ref_loss"])
    assert not [p for p in workdir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_torchrun_train_equals_one_process_on_the_same_global_batch(workdir: Path, scored: Path) -> None:
    from safetensors.torch import load_file

    with one_thread():
        assert main(train_argv(workdir, "train1")) == 0
    proc = torchrun(2, train_argv(workdir, "train2"))
    assert proc.stdout.count("trained ") == 1

    h1 = json.loads((workdir / "train1" / "history.json").read_text())
    h2 = json.loads((workdir / "train2" / "history.json").read_text())
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [1, 2, 3, 4]
    for a, b in zip(h1, h2, strict=True):
        # the same selection: the tokens actually kept (counted over both ranks) and the threshold
        assert a["kept"] == b["kept"] and a["kept"] < 0.61
        assert b["threshold"] == pytest.approx(a["threshold"], rel=1e-5, abs=1e-6)
        # the same summed gradient: its norm before clipping (a wrong DDP scaling would halve or double it)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["loss_all"] == pytest.approx(a["loss_all"], rel=1e-6)
        # evaluation, sharded over the ranks by batch and all-reduced
        assert ("eval_loss" in b) == ("eval_loss" in a) == (a["step"] % 2 == 0)
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
    assert any(h["grad_norm"] > 1.0 for h in h1)  # clipping is active: the gradient's scale reaches the weights

    w1 = load_file(workdir / "train1" / "model" / "model.safetensors")
    w2 = load_file(workdir / "train2" / "model" / "model.safetensors")
    init = tiny_llama(300, seed=3).state_dict()
    assert w1.keys() == w2.keys()
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    moved = max(float((w1[k] - init[k]).abs().max()) for k in w1)
    print(f"max |w(1 process) - w(2 processes)| = {diff:.3g}; max |w - w0| = {moved:.3g}")
    assert moved > 1e-2  # training moved the weights far more than the tolerance below
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5, msg=k)
    # rank 0 alone wrote; the checkpoint holds the last step and resumes
    state = torch.load(workdir / "train2" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 4


TRAINER_SCRIPT = r'''
"""One SGD step (lr 1) of SelectiveTrainer(scope="global") under torchrun; each rank saves its weights."""
import json
import sys
from pathlib import Path

import datasets
import torch
from transformers import TrainingArguments

sys.path.insert(0, sys.argv[2])
from pipeline_fixtures import random_rows, tiny_llama

from rho_fused.data import pad_batch
from rho_fused.hf import kept_count
from rho_fused.hf_trainer import SelectiveTrainer

out = Path(sys.argv[1])
rows = random_rows(4, 50, lengths=(4, 15), seed=5)
ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
model = tiny_llama(50, seed=1)
args = TrainingArguments(
    output_dir=str(out), per_device_train_batch_size=2, max_steps=1, max_grad_norm=0.0, report_to="none",
    use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
)
sgd = torch.optim.SGD(model.parameters(), lr=1.0)
trainer = SelectiveTrainer(
    model=model, args=args, train_dataset=ds, keep_ratio=0.5, scope="global",
    optimizers=(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0)),
)
trainer.train()
rank = torch.distributed.get_rank()
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out / f"rank{rank}.pt")
own = pad_batch(rows[2 * rank : 2 * rank + 2])["labels"]
info = {"wrapper": type(trainer.model_wrapped).__name__, "kept_global": kept_count(own, 0.5, scope="global")}
(out / f"rank{rank}.json").write_text(json.dumps(info))
# leave together and tear the group down: a gloo group alive at interpreter exit can abort (SIGABRT)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def test_torchrun_selective_trainer_global_scope_syncs_and_matches_one_process(tmp_path: Path) -> None:
    """Trainer + DDP on 2 processes: the step equals the 1-process gradient of the 4 rows, on both ranks.

    The loss runs through the DDP wrapper; calling the unwrapped model's body instead would leave
    each rank with its own gradient: the ranks would then differ.
    """
    from pipeline_fixtures import random_rows

    from rho_fused.data import pad_batch
    from rho_fused.hf import causal_lm_loss, kept_count

    script = tmp_path / "trainer_ddp.py"
    script.write_text(TRAINER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           str(tmp_path), str(Path(__file__).parent)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # the expected step: the gradient of the kept tokens' mean over all 4 rows, one process
    rows = random_rows(4, 50, lengths=(4, 15), seed=5)
    model = tiny_llama(50, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    b = pad_batch(rows)
    n_keep = kept_count(b["labels"], 0.5)
    loss = causal_lm_loss(model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"],
                          ref_loss=b["ref_loss"], keep_ratio=0.5, reduction="sum")  # fmt: skip
    (loss / n_keep).backward()

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r in (0, 1):
        info = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert info == {"wrapper": "DistributedDataParallel", "kept_global": n_keep}
    for name, p in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP synchronised the gradients
        torch.testing.assert_close(before[name] - ranks[0][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
