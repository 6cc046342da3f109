"""`rho-fused train --ref-model` equals score-then-train; TensorBoard, the token trajectory and `rho-fused report`.

The token view is opened in headless Chromium (Debian's ``chromium``; `.ci/run` installs it when
missing), and what its script drew is read back from the rendered DOM.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import one_thread, reference_workdir

from rho_fused.cli import main

TRAIN = ["--seq-len", "16", "--keep-ratio", "0.6", "--steps", "3", "--batch-size", "4", "--lr", "3e-3",
         "--warmup-steps", "1", "--log-every", "1", "--seed", "3", "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An offline run (score, then train) and an online one (train --ref-model) on the same corpus."""
    root = reference_workdir(tmp_path_factory.mktemp("report"))
    ref, corpus = str(root / "ref"), str(root / "corpus.jsonl")
    with one_thread():
        assert main(["score", "--ref-model", ref, "--corpus", corpus, "--seq-len", "16", "--out",
                     str(root / "scored"), "--no-progress"]) == 0  # fmt: skip
        off = ["train", "--data", str(root / "scored"), "--eval-data", str(root / "scored"), "--config", ref]
        assert main([*off, "--out", str(root / "offline"), *TRAIN[2:]]) == 0
        on = ["train", "--data", corpus, "--eval-data", corpus, "--ref-model", ref, "--config", ref]
        extras = ["--report-to", "tensorboard", "--trajectory-every", "2", "--trajectory-rows", "2"]
        assert main([*on, "--out", str(root / "online"), *TRAIN, *extras]) == 0
    return {"offline": root / "offline", "online": root / "online", "root": root}


def test_online_reference_run_equals_score_then_train(runs) -> None:
    off, on = _weights(runs["offline"] / "model"), _weights(runs["online"] / "model")
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    h_off = json.loads((runs["offline"] / "history.json").read_text())
    h_on = json.loads((runs["online"] / "history.json").read_text())
    assert len(h_on) == len(h_off) == 3
    # packed text: every row is --seq-len tokens, no padding anywhere, so the online ref_loss is the
    # scored one bit for bit, and so is every logged number (tokens/s aside)
    assert [{k: v for k, v in h.items() if k != "tok_per_s"} for h in h_on] == [
        {k: v for k, v in h.items() if k != "tok_per_s"} for h in h_off
    ]
    assert "ref_loss" in h_on[0] and "excess_dropped" in h_on[0] and "eval_loss" in h_on[-1]


def test_tensorboard_has_the_history(runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = json.loads((runs["online"] / "history.json").read_text())
    events = EventAccumulator(str(runs["online"] / "tensorboard"))
    events.Reload()
    for key in ("loss", "kept", "threshold", "excess_kept", "excess_dropped", "ref_loss", "tok_per_s"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [h["step"] for h in history]
        assert [s.value for s in scalars] == pytest.approx([h[key] for h in history], rel=1e-6), key
    assert [s.value for s in events.Scalars("eval/loss")] == pytest.approx([history[-1]["eval_loss"]], rel=1e-6)


def test_trajectory_records_the_held_out_sample(runs) -> None:
    traj = json.loads((runs["online"] / "trajectory.json").read_text())
    assert [r["step"] for r in traj["records"]] == [2, 3]  # every 2 steps, and the last
    lengths = [len(ids) for ids in traj["input_ids"]]
    assert len(lengths) == 2
    for rec in traj["records"]:
        for row, n in enumerate(lengths):
            kept = rec["kept"][row]
            assert len(kept) == n and kept[0] == 0
            assert sum(kept) == math.ceil(0.6 * (n - 1))  # per sequence, over the n - 1 predicted tokens
            for t in range(1, n):
                assert rec["excess"][row][t] == pytest.approx(rec["ce"][row][t] - rec["ref_loss"][row][t], abs=2e-5)
    assert traj["records"][0]["ce"] != traj["records"][1]["ce"]  # the model moved between the records


class _Spans(HTMLParser):
    """The token spans of the rendered view (class ``tok``), with their classes and tooltips."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, str]] = []
        self.summary = ""
        self._in_summary = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            self.spans.append(attrs)
        self._in_summary = attrs.get("id") == "summary"

    def handle_data(self, data):
        if self._in_summary:
            self.summary += data

    def handle_endtag(self, tag):
        self._in_summary = False


def test_report_draws_curves_and_a_token_view_chromium_renders(runs) -> None:
    out = runs["root"] / "report"
    assert main(["report", str(runs["online"]), "--out", str(out)]) == 0
    import matplotlib.image

    png = matplotlib.image.imread(str(out / "curves.png"))
    assert png.shape[0] > 400 and png.shape[1] > 600 and png[..., :3].std() > 0.05  # drawn, not blank

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed for this test: apt-get install -y chromium (.ci/run does)"
    page = (out / "tokens.html").resolve()
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rendered = _Spans()
    rendered.feed(done.stdout)
    traj = json.loads((runs["online"] / "trajectory.json").read_text())
    last = traj["records"][-1]
    n_tokens = sum(len(ids) for ids in traj["input_ids"])
    n_kept = sum(sum(k) for k in last["kept"])
    assert len(rendered.spans) == n_tokens  # the script drew every token of the sample
    assert sum("k" in s["class"].split() for s in rendered.spans) == n_kept
    assert (
        rendered.summary.strip() == f"step {last['step']}: {n_kept} of {n_tokens - len(traj['input_ids'])} tokens kept"
    )
    scored = [s for s in rendered.spans if "data-excess" in s]
    assert all(re.search(r"excess by step: 2: .*, 3: ", s["title"]) for s in scored)  # the trajectory per token
    assert any("rgba(40, 160, 40" in s["style"] for s in scored) and any(
        "rgba(220, 60, 60" in s["style"] for s in scored
    )
    # the tokens are decoded with the run's tokenizer (not shown as [id])
    assert not all(re.fullmatch(r"\[\d+\]", s.get("title", "")) for s in rendered.spans)


def test_errors_name_the_option(runs, tmp_path, capsys) -> None:
    from pipeline_fixtures import make_tokenizer

    root = runs["root"]
    assert main(["report", str(tmp_path)]) == 2  # an empty directory: no log to draw
    assert "history.json" in capsys.readouterr().err
    base = ["train", "--data", str(root / "corpus.jsonl"), "--config", str(root / "ref"), "--out", str(tmp_path / "r")]
    assert main([*base, "--ref-model", str(root / "ref"), *TRAIN, "--trajectory-every", "2"]) == 2
    assert "--trajectory-every needs --eval-data" in capsys.readouterr().err
    make_tokenizer(200).save_pretrained(tmp_path / "other_tok")  # not the reference's tokenizer
    args = [*base, "--ref-model", str(root / "ref"), "--tokenizer", str(tmp_path / "other_tok"), *TRAIN]
    assert main(args) == 2
    assert "--ref-model" in capsys.readouterr().err
    assert main([*base, "--ref-model", str(tmp_path / "missing"), *TRAIN]) == 2
    assert "reference model directory not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written by a refused run
