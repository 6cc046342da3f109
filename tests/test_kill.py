"""Kill-safety: `score` and `train` SIGKILLed mid-run leave the last complete output loadable, and
``train --resume`` after the kill ends with the weights of an uninterrupted run.

Each run is a real subprocess killed with SIGKILL. To make the moment of death certain rather than
lucky, the subprocess is started through a small driver that pauses at a chosen point (half-way
through writing a checkpoint file; or between the two renames that replace an output directory,
when the old output has been moved aside and the new one not yet moved in) and tells the test,
which then kills it there. Under torchrun, rank 0 (the writer) is killed and torchrun takes the
other rank down, as when a node dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import TEXTS, make_tokenizer, one_thread, reference_workdir
from safetensors.torch import load_file

from rho_fused.cli import main
from rho_fused.outputs import MARKER
from rho_fused.scoring import load_scored, read_meta

DRIVER = r'''
"""Run `rho-fused ARGV`, pausing (for the test to SIGKILL this process) at the KILL_AT-th KILL_POINT."""
import io
import os
import sys
import time
from pathlib import Path

point, nth, marker = os.environ["KILL_POINT"], int(os.environ["KILL_AT"]), Path(os.environ["KILL_MARKER"])
calls = 0


def pause():
    marker.write_text(str(os.getpid()))
    time.sleep(300)
    os._exit(3)  # never reached when the test kills us


if point == "rename":  # the old output moved aside, the new one not yet moved in
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        global calls
        real_replace(src, dst, **kwargs)
        if ".old-" in os.fspath(dst):
            calls += 1
            if calls == nth:
                pause()

    os.replace = replace
elif point == "save":  # half of the checkpoint file written
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        global calls
        calls += 1
        if calls < nth:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):  # an open file (how train_loop saves)
            f.write(half)
            f.flush()
        else:
            with open(f, "wb") as out:
                out.write(half)
        pause()

    torch.save = save

from rho_fused.cli import main

sys.exit(main(sys.argv[1:]))
'''


def run_and_kill(tmp: Path, argv: list[str], point: str, nth: int, nproc: int = 1) -> None:
    """Start ``rho-fused ARGV`` (under torchrun when ``nproc > 1``), SIGKILL it at its ``nth`` ``point``."""
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp / f"marker-{time.monotonic_ns()}"  # new for each run
    env = {**os.environ, "KILL_POINT": point, "KILL_AT": str(nth), "KILL_MARKER": str(marker),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.Popen([*launcher, str(driver), *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the run ended (code {proc.returncode}) before reaching {point} #{nth}: {err[-3000:]!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach {point} #{nth} in 120 s")
            time.sleep(0.02)
        time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the paused process: rank 0 under torchrun
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code != 0  # it died: one process by SIGKILL, torchrun because a worker did


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = reference_workdir(tmp_path_factory.mktemp("kill"))
    with one_thread():
        assert main(score_argv(root, "scored")) == 0
        assert main(train_argv(root, "straight")) == 0  # the uninterrupted run
    return root


def score_argv(root: Path, out: str, corpus: str = "corpus.jsonl") -> list[str]:
    return ["score", "--ref-model", str(root / "ref"), "--corpus", str(root / corpus), "--out", str(root / out),
            "--seq-len", "24", "--batch-size", "4", "--no-progress"]  # fmt: skip


def train_argv(root: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--data", str(root / "scored"), "--config", str(root / "ref"), "--out", str(root / out),
            "--steps", "6", "--batch-size", "4", "--warmup-steps", "1", "--lr", "3e-3", "--keep-ratio", "0.6",
            "--seed", "2", "--log-every", "1", "--checkpoint-every", "1", "--no-progress", *extra]  # fmt: skip


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("point", ["save", "rename"])
def test_train_killed_mid_checkpoint_resumes_to_the_same_weights(workdir: Path, point: str) -> None:
    run = workdir / f"killed-{point}"
    run_and_kill(workdir, train_argv(workdir, run.name), point, nth=3)  # killed writing the 3rd checkpoint
    assert not (run / "model").exists()
    leftovers = [p.name for p in run.iterdir()]
    if point == "save":
        # the 3rd checkpoint died half-written in its temporary directory; the 2nd is intact
        (tmp,) = [p for p in run.iterdir() if p.name.startswith(".checkpoint.tmp-")]
        with pytest.raises(Exception):  # noqa: B017, PT011 - a truncated file: any unpickling error
            torch.load(tmp / "state.pt", weights_only=False)
        assert torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    else:
        # killed between the renames: no checkpoint/ at all, the complete 2nd one moved aside
        assert "checkpoint" not in leftovers and any(n.startswith(".checkpoint.old-") for n in leftovers)

    with one_thread():
        assert main(train_argv(workdir, run.name, "--resume")) == 0
    assert_same_weights(weights(run), weights(workdir / "straight"))
    logs = [json.loads((r / "history.json").read_text()) for r in (run, workdir / "straight")]
    assert [{k: v for k, v in h.items() if k != "tok_per_s"} for h in logs[0]] == [
        {k: v for k, v in h.items() if k != "tok_per_s"} for h in logs[1]
    ]
    # nothing stale left (the marker says rho-fused wrote the run; the dead writer's lock was cleared)
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "checkpoint", "history.json", "model"]
    assert not (run.parent / f".{run.name}.lock").exists()


def test_torchrun_train_killed_resumes_under_torchrun(workdir: Path) -> None:
    """2 ranks; rank 0 killed between the renames of its 3rd checkpoint; 2 ranks resume from it."""
    run = workdir / "killed-torchrun"
    run_and_kill(workdir, train_argv(workdir, run.name), "rename", nth=3, nproc=2)
    assert not (run / "model").exists() and not (run / "checkpoint").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "rho_fused",
         *train_argv(workdir, run.name, "--resume")],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the same global batches as the one-process run: the same weights up to fp32 rounding
    straight, resumed = weights(workdir / "straight"), weights(run)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-5, msg=k)


def test_score_killed_while_replacing_its_output_keeps_the_previous_one(workdir: Path) -> None:
    out = workdir / "rescored"
    with one_thread():
        assert main(score_argv(workdir, out.name)) == 0
    before = read_meta(out)
    (workdir / "other.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[60:80]))

    # killed between the renames that replace the output: the previous output is put back when read
    run_and_kill(workdir, [*score_argv(workdir, out.name, "other.jsonl"), "--overwrite"], "rename", nth=1)
    assert not out.exists()
    ds, meta = load_scored(out, make_tokenizer(300))
    assert meta == before and len(ds) == before["n_sequences"]

    # the same command run again to the end writes what an uninterrupted run writes
    with one_thread():
        assert main([*score_argv(workdir, out.name, "other.jsonl"), "--overwrite"]) == 0
        assert main(score_argv(workdir, "other-straight", "other.jsonl")) == 0
    assert read_meta(out) == read_meta(workdir / "other-straight") != before
    assert not [p for p in workdir.iterdir() if p.name.startswith((".rescored.tmp-", ".rescored.old-"))]


def test_recover_survives_a_sibling_that_another_process_moved(tmp_path: Path, monkeypatch) -> None:
    """Two ranks recover the same output at once: an ``.old-PID`` sibling the glob saw can be gone
    (renamed back by the other) before it is looked at; the newest one still there is put back."""
    from rho_fused import atomic

    final = tmp_path / "checkpoint"
    older, newer = tmp_path / ".checkpoint.old-101", tmp_path / ".checkpoint.old-102"
    for i, d in enumerate((older, newer)):
        d.mkdir()
        (d / "state").write_text(d.name)
        os.utime(d, (1000 + i, 1000 + i))
    moved = tmp_path / ".checkpoint.old-103"  # listed by the glob, renamed away before its stat
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [*real_glob(self, pattern), moved])
    assert atomic.recover(final)
    assert (final / "state").read_text() == newer.name and older.exists()
