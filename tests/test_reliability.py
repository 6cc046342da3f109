"""Nothing lost, nothing silent: outputs, progress, checks before the first step, one-line errors, modes.

Each test guards one class of failure a hostile user met (issue 12): an output destroyed or silently
replaced, training progress lost to a signal or a bad row, bad input accepted or found late, a
traceback or an unclear message instead of one line, files created without regard to the umask.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import make_tokenizer, one_thread, random_rows, reference_workdir, tiny_llama
from safetensors.torch import load_file

from rho_fused.cli import build_parser, main
from rho_fused.data import pad_batch, split_rows
from rho_fused.errors import DataError, RunError, Stopped, UsageError
from rho_fused.outputs import MARKER, OutputLock
from rho_fused.scoring import score_corpus
from rho_fused.train_loop import TrainConfig, evaluate, train

VOCAB = 60


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny reference model with its tokenizer (``ref/``), a corpus and its scored dataset (``scored/``)."""
    root = reference_workdir(tmp_path_factory.mktemp("reliability"))
    with one_thread():
        assert main(score_argv(root, "scored")) == 0
    return root


def score_argv(root: Path, out: str, *extra: str) -> list[str]:
    return ["score", "--ref-model", str(root / "ref"), "--corpus", str(root / "corpus.jsonl"), "--out",
            str(root / out), "--seq-len", "24", "--no-progress", *extra]  # fmt: skip


def train_argv(root: Path, out: str, *extra: str, data: str = "scored") -> list[str]:
    return ["train", "--data", str(root / data), "--config", str(root / "ref"), "--out", str(root / out),
            "--steps", "5", "--batch-size", "4", "--warmup-steps", "1", "--lr", "3e-3", "--keep-ratio", "0.6",
            "--seed", "2", "--log-every", "1", "--no-progress", *extra]  # fmt: skip


def one_error_line(err: str, command: str) -> str:
    """The single line a failed command printed; fails on a traceback or on several lines."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"rho-fused {command}: error: "), lines[0]
    return lines[0]


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=3, lr=3e-3, min_lr=3e-4, warmup_steps=2, keep_ratio=0.6, seed=7, log_every=1)
    return TrainConfig(**{**base, **kw})


# --- outputs: nothing of the user's is replaced; a second writer is refused ------------------------------


def test_overwrite_replaces_only_outputs_of_rho_fused(work: Path, capsys) -> None:
    precious = work / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert main(score_argv(work, "precious", "--overwrite")) == 2
    line = one_error_line(capsys.readouterr().err, "score")
    assert "not written by rho-fused" in line and "thesis.tex" in line
    assert (precious / "thesis.tex").read_text() == "years of work"
    # train refuses it too, with or without --overwrite or --resume
    for extra in ((), ("--overwrite",), ("--resume",)):
        assert main(train_argv(work, "precious", *extra)) == 2
        assert "precious" in one_error_line(capsys.readouterr().err, "train")
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]
    # an output that score wrote is marked, and --overwrite replaces it
    assert (work / "scored" / MARKER).is_file()
    assert main(score_argv(work, "scored", "--overwrite")) == 0


def test_train_refuses_an_existing_run_without_resume_or_overwrite(work: Path, capsys) -> None:
    run = work / "run-twice"
    assert main(train_argv(work, run.name, "--steps", "2")) == 0
    before = load_file(run / "model" / "model.safetensors")
    assert main(train_argv(work, run.name, "--steps", "3")) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "already exists" in line and "--resume" in line and "--overwrite" in line
    after = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched
    assert main(train_argv(work, run.name, "--steps", "3", "--resume", "--overwrite")) == 2
    assert main(train_argv(work, run.name, "--steps", "3", "--overwrite")) == 0
    assert json.loads((run / "history.json").read_text())[-1]["step"] == 3
    assert not (run.parent / f".{run.name}.lock").exists()  # the lock went with the run


def test_lock_refuses_a_live_writer_and_clears_a_dead_ones(tmp_path) -> None:
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file = tmp_path / ".run.lock"
        lock_file.write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid}))
        with pytest.raises(RunError, match=f"process {sleeper.pid}"):
            OutputLock(out).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputLock(out) as lock:  # the holder is gone: its lock is cleared
        assert json.loads(lock.file.read_text())["pid"] == os.getpid()
        with pytest.raises(RunError, match="being written"):
            OutputLock(out).acquire()
    assert not lock_file.exists()


def test_resume_refuses_other_data_naming_both(tmp_path) -> None:
    rows, other = random_rows(6, VOCAB, seed=2), random_rows(7, VOCAB, seed=3)
    train(tiny_llama(VOCAB), rows, _cfg(), out_dir=tmp_path, stop_at=2, progress=False, data_name="a")
    with pytest.raises(UsageError, match=r"trained on a \(6 rows, fingerprint \w+\), the data given is b \(7 rows"):
        train(tiny_llama(VOCAB), other, _cfg(), out_dir=tmp_path, resume=True, progress=False, data_name="b")
    with pytest.raises(UsageError, match=r"lr \(--lr\) was 0.003 when it was written, now 0.002"):
        train(tiny_llama(VOCAB), rows, _cfg(lr=2e-3), out_dir=tmp_path, resume=True, progress=False)


# --- progress: periodic checkpoints, signals, a bad row met late -----------------------------------------


def test_checkpoints_are_periodic_by_default_by_steps_and_by_time(tmp_path, monkeypatch) -> None:
    d = TrainConfig()
    assert d.checkpoint_every > 0 and d.checkpoint_seconds > 0
    import rho_fused.train_loop as loop

    saved: list[int] = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda p, m, o, s: (saved.append(s["step"]), real(p, m, o, s)))
    rows = random_rows(6, VOCAB, seed=2)
    train(tiny_llama(VOCAB), rows, _cfg(steps=5, checkpoint_every=2, checkpoint_seconds=0), out_dir=tmp_path / "a")
    assert saved == [2, 4, 5]
    saved.clear()
    train(tiny_llama(VOCAB), rows, _cfg(steps=3, checkpoint_every=0, checkpoint_seconds=1e-9), out_dir=tmp_path / "b")
    assert saved == [1, 2, 3]  # every step is past the clock


SIGNAL_DRIVER = r"""
import os, signal, sys
import rho_fused.train_loop as loop

real = loop.lr_at


def lr_at(step, cfg):  # the signal arrives while step SIGNAL_AT (0-based) is under way
    if step == int(os.environ["SIGNAL_AT"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return real(step, cfg)


loop.lr_at = lr_at
from rho_fused.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_checkpoints_at_the_step_boundary_and_says_how_to_resume(work: Path, tmp_path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER)
    run = work / "run-sigterm"
    env = {**os.environ, "SIGNAL_AT": "2", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    argv = train_argv(work, run.name, "--checkpoint-every", "0")
    proc = subprocess.run([sys.executable, str(driver), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("rho-fused train: stopped")][-1]
    assert "stopped by SIGTERM after step 3 of 5" in line and "--resume" in line and "Traceback" not in proc.stderr
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    assert not (run / "model").exists()


def test_sigint_in_process_stops_with_a_checkpoint(tmp_path, monkeypatch) -> None:
    import rho_fused.train_loop as loop

    real = loop.lr_at

    def lr_at(step: int, cfg: TrainConfig) -> float:
        if step == 1:
            signal.raise_signal(signal.SIGINT)
        return real(step, cfg)

    monkeypatch.setattr(loop, "lr_at", lr_at)
    rows = random_rows(6, VOCAB, seed=2)
    with pytest.raises(Stopped, match="stopped by SIGINT after step 2 of 6") as e:
        train(tiny_llama(VOCAB), rows, _cfg(checkpoint_every=0), out_dir=tmp_path, handle_signals=True, progress=False)
    assert e.value.signum == signal.SIGINT
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    # resumed, it ends with the weights of an uninterrupted run
    resumed, straight = tiny_llama(VOCAB, seed=5), tiny_llama(VOCAB)
    train(resumed, rows, _cfg(checkpoint_every=0), out_dir=tmp_path, resume=True, progress=False)
    train(straight, rows, _cfg(checkpoint_every=0), progress=False)
    a, b = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_row_met_during_training_names_step_and_row_and_keeps_progress(tmp_path) -> None:
    rows = random_rows(12, VOCAB, seed=4)
    rows[5]["input_ids"][2] = VOCAB + 7
    model = tiny_llama(VOCAB)
    with pytest.raises(RunError, match=r"step (\d+) of 20: the training data, row 5: token id 67 at position 2") as e:
        train(model, rows, _cfg(steps=20, checkpoint_every=0), out_dir=tmp_path, check_data=False, progress=False)
    step = int(e.value.args[0].split("step ")[1].split(" ")[0])
    assert f"checkpoint of step {step - 1} is in" in str(e.value)
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == step - 1
    # checked before the first step, the same row is refused before any work
    with pytest.raises(DataError, match="row 5: token id 67"):
        train(tiny_llama(VOCAB), rows, _cfg(), out_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_a_run_refused_before_its_first_step_leaves_nothing_in_the_way(work: Path, tmp_path, capsys) -> None:
    """Bad data refused up front (exit 1, row named); the same --out is then free for the fixed data."""
    import datasets

    from rho_fused.scoring import load_scored

    data, meta = load_scored(work / "scored")
    ids = [np.array(r["input_ids"]) for r in data]
    ids[4][3] = 5000
    bad = work / "scored-bad"  # the one-dataset layout (format 1), which load_scored still reads
    ref = [np.array(r["ref_loss"]) for r in data]
    datasets.Dataset.from_dict({"input_ids": ids, "ref_loss": ref}).save_to_disk(bad)
    (bad / "rho_fused.json").write_text(json.dumps({**meta, "format_version": 1, "shards": None}))
    assert main(train_argv(work, "run-bad", data=bad.name)) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"--data {bad}, row 4: token id 5000 at position 3 is outside the vocabulary [0, 300)" in line
    assert not (work / "run-bad" / "checkpoint").exists()
    assert main(train_argv(work, "run-bad", "--steps", "1")) == 0


# --- checks before the first step ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "--steps", "-3"], "argument --steps: expected an integer >= 1, got -3"),
        (["train", "--accum-steps", "0"], "argument --accum-steps: expected an integer >= 1, got 0"),
        (["train", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
        (["train", "--keep-ratio", "nan"], "argument --keep-ratio: expected a number in (0, 1], got nan"),
        (["train", "--keep-ratio", "1.5"], "argument --keep-ratio: expected a number in (0, 1]"),
        (["train", "--log-every", "0"], "argument --log-every: expected an integer >= 1"),
        (["train", "--beta1", "1"], "argument --beta1: expected a number in [0, 1)"),
        (["train", "--lr", "x"], "argument --lr: expected a number > 0, got 'x'"),
        (["score", "--seq-len", "1"], "argument --seq-len: expected an integer >= 2, got 1"),
        (["score", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    ],
)
def test_numeric_options_are_range_checked_when_parsed(argv: list[str], words: str, capsys) -> None:
    required = {"train": ["--data", "d", "--config", "c", "--out", "o"],
                "score": ["--ref-model", "r", "--corpus", "c", "--out", "o"]}[argv[0]]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([argv[0], *required, *argv[1:]])
    assert e.value.code == 2
    assert words in one_error_line(capsys.readouterr().err, argv[0])


def test_score_refuses_non_finite_reference_losses(tmp_path) -> None:
    tok = make_tokenizer(300)
    model = tiny_llama(len(tok), seed=3)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")  # as a reference that overflowed to inf - inf would be
    rows = [np.arange(3, 15, dtype=np.int32), np.arange(20, 30, dtype=np.int32)]
    with pytest.raises(DataError, match=r"loss is nan at block 0, row 0, position 1 .*--dtype float32"):
        score_corpus(model, tok, rows, tmp_path / "out", seq_len=16, progress=False)
    assert not (tmp_path / "out").exists()


def test_rows_are_checked_ids_lengths_and_predictable_tokens() -> None:
    with pytest.raises(DataError, match=r"corpus row 1: input_ids\[0\] = 1.5 is not an integer"):
        split_rows([[1, 2, 3], [1.5, 2.0]], 8)
    with pytest.raises(DataError, match="corpus row 0: token id -3 at position 2"):
        split_rows([[1, 2, -3, 4]], 8)
    assert [r.tolist() for r in split_rows([[1.0, 2.0, 3.0]], 8)] == [[1, 2, 3]]  # whole numbers are ids
    # a ref_loss row of the wrong length: named, in train's batches and SelectiveTrainer's collator alike
    from rho_fused.hf_trainer import SelectiveDataCollator

    rows = [{"input_ids": [1, 2, 3], "ref_loss": [0.0, 1.0, 2.0]}, {"input_ids": [4, 5, 6, 7], "ref_loss": [0.0, 1.0]}]
    for collate in (pad_batch, SelectiveDataCollator()):
        with pytest.raises(DataError, match="row 1 of the batch has 2 ref_loss values for its 4 input_ids"):
            collate(rows)
    # evaluation data with no predictable token has no loss, not a loss of 0
    with pytest.raises(DataError, match="no predictable token"):
        evaluate(tiny_llama(VOCAB), [{"input_ids": np.array([3])}, {"input_ids": np.array([4])}])
    bad_ref = random_rows(4, VOCAB, seed=1)
    bad_ref[3]["ref_loss"][2] = float("nan")
    with pytest.raises(DataError, match=r"row 3: ref_loss\[2\] = nan at a scored position"):
        train(tiny_llama(VOCAB), bad_ref, _cfg(steps=1), progress=False)


# --- one line per error, named; full disk and read-only file system ---------------------------------------


def test_errors_are_one_line_naming_the_file_or_option(work: Path, capsys) -> None:
    (work / "notamodel").mkdir(exist_ok=True)
    (work / "notamodel" / "x.txt").write_text("hi")
    cases = [
        (score_argv(work, "o1") + ["--ref-model", str(work / "missing")], 2, "--ref-model"),
        (score_argv(work, "o2") + ["--ref-model", str(work / "notamodel"), "--tokenizer", str(work / "ref")], 2,
         "not a model directory"),
        (score_argv(work, "o3") + ["--corpus", str(work / "missing.jsonl")], 2, "missing.jsonl"),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((score_argv(work, "o4", "--device", "cuda"), 2, "--device cuda: CUDA is not available"))
    (work / "empty.jsonl").write_text("")
    cases.append((score_argv(work, "o5") + ["--corpus", str(work / "empty.jsonl")], 1, "empty.jsonl is empty"))
    (work / "blank.txt").write_text("\n  \n\n")
    cases.append((score_argv(work, "o7") + ["--corpus", str(work / "blank.txt")], 1, "gave no token rows"))
    (work / "bad.jsonl").write_text("{not json\n")
    cases.append((score_argv(work, "o6") + ["--corpus", str(work / "bad.jsonl")], 1, "bad.jsonl cannot be read"))
    for argv, code, words in cases:
        assert main(argv) == code, argv
        assert words in one_error_line(capsys.readouterr().err, "score")

    # a damaged scored dataset and a damaged checkpoint
    damaged = work / "damaged"
    damaged.mkdir()
    (damaged / "rho_fused.json").write_text("{oops")
    assert main(train_argv(work, "t1", data="damaged")) == 1
    assert "rho_fused.json is not valid JSON" in one_error_line(capsys.readouterr().err, "train")
    assert main(train_argv(work, "t2", "--stop-at", "1")) == 0
    capsys.readouterr()
    state = work / "t2" / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    assert main(train_argv(work, "t2", "--resume")) == 1
    assert "state.pt is unreadable" in one_error_line(capsys.readouterr().err, "train")
    # --debug shows the traceback as well
    assert main([*train_argv(work, "t2", "--resume"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_full_disk_and_read_only_file_system_are_named(work: Path, capsys, monkeypatch) -> None:
    import rho_fused.atomic as atomic
    import rho_fused.train_loop as loop

    run = work / "run-full"
    assert main(train_argv(work, run.name, "--stop-at", "1")) == 0
    capsys.readouterr()

    class FullDisk:
        """A file whose writes fail as they do on a full disk."""

        def __init__(self, path, mode):
            self.name = str(path)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

        def flush(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(loop, "open", FullDisk, raising=False)
    assert main(train_argv(work, run.name, "--resume")) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert "no space left on device while writing" in line and "state.pt" in line
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"] == 1  # the last one, intact
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(kwargs.get("dir")))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
    assert main(score_argv(work, "ro-out")) == 1
    assert "read-only file system: cannot write" in one_error_line(capsys.readouterr().err, "score")


# --- modes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask: int) -> None:
    tok = make_tokenizer(300)
    old = os.umask(umask)
    try:
        score_corpus(tiny_llama(len(tok)), tok, [np.arange(2, 12, dtype=np.int32)], tmp_path / "s", seq_len=10,
                     progress=False)  # fmt: skip
        train(tiny_llama(len(tok)), random_rows(3, len(tok)), _cfg(steps=1, batch_size=2), out_dir=tmp_path / "t",
              progress=False)  # fmt: skip
    finally:
        os.umask(old)
    for path in (tmp_path / "s", tmp_path / "t" / "checkpoint"):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
    for path in (
        tmp_path / "s" / "rho_fused.json",
        tmp_path / "s" / MARKER,
        tmp_path / "t" / "checkpoint" / "state.pt",
    ):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
