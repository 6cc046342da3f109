"""The training loop: resume gives the same weights; accumulation; schedule; the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from pipeline_fixtures import TEXTS, make_tokenizer, one_thread, random_rows, tiny_llama

from rho_fused.cli import main
from rho_fused.train_loop import TrainConfig, lr_at, train

VOCAB = 60


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=3, lr=3e-3, min_lr=3e-4, warmup_steps=2, keep_ratio=0.6, seed=7, log_every=1)
    return TrainConfig(**{**base, **kw})


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_resume_gives_the_same_final_weights(tmp_path, accum_steps: int) -> None:
    rows = random_rows(10, VOCAB, seed=1)  # 10 rows, 3 or 6 per step: the resume crosses epochs
    cfg = _cfg(accum_steps=accum_steps)

    straight = tiny_llama(VOCAB, seed=0)
    hist_straight = train(straight, rows, cfg, out_dir=tmp_path / "a", progress=False)

    first = tiny_llama(VOCAB, seed=0)
    train(first, rows, cfg, out_dir=tmp_path / "b", stop_at=3, progress=False)
    assert not _same_weights(first, straight)
    resumed = tiny_llama(VOCAB, seed=99)  # another process, other initial weights: all comes from the checkpoint
    hist_resumed = train(resumed, rows, cfg, out_dir=tmp_path / "b", resume=True, progress=False)

    assert _same_weights(resumed, straight)
    drop = ("tok_per_s",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in hist_resumed] == [
        {k: v for k, v in h.items() if k not in drop} for h in hist_straight
    ]


def test_resume_refuses_another_config(tmp_path) -> None:
    rows = random_rows(6, VOCAB, seed=2)
    train(tiny_llama(VOCAB), rows, _cfg(), out_dir=tmp_path, stop_at=2, progress=False)
    with pytest.raises(ValueError, match="keep_ratio"):
        train(tiny_llama(VOCAB), rows, _cfg(keep_ratio=0.5), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(FileNotFoundError):
        train(tiny_llama(VOCAB), rows, _cfg(), out_dir=tmp_path / "nothing", resume=True, progress=False)


def test_accumulation_is_normalised_by_kept_tokens(tmp_path) -> None:
    """Two micro-batches of 2 rows equal one batch of 4 (per-sequence selection, rows of other lengths)."""
    rows = random_rows(8, VOCAB, lengths=(3, 16), seed=3)
    one = tiny_llama(VOCAB, seed=0)
    two = tiny_llama(VOCAB, seed=0)
    cfg = _cfg(steps=1, warmup_steps=1, scope="sequence", grad_clip=1e9)
    train(one, rows, dataclasses.replace(cfg, batch_size=4), progress=False)
    train(two, rows, dataclasses.replace(cfg, batch_size=2, accum_steps=2), progress=False)
    for (name, p), q in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_plain_clm_ignores_ref_loss_and_slm_needs_it() -> None:
    rows = random_rows(6, VOCAB, seed=4)
    a, b = tiny_llama(VOCAB), tiny_llama(VOCAB)
    train(a, rows, _cfg(keep_ratio=1.0, steps=2), progress=False)
    no_ref = [{"input_ids": r["input_ids"]} for r in rows]
    hist = train(b, no_ref, _cfg(keep_ratio=1.0, steps=2), progress=False)
    assert _same_weights(a, b)
    assert hist[-1]["kept"] == 1.0
    with pytest.raises(ValueError, match="ref_loss"):
        train(tiny_llama(VOCAB), no_ref, _cfg(), progress=False)


def test_slm_keeps_the_ratio_and_logs() -> None:
    rows = random_rows(6, VOCAB, lengths=(10, 10), seed=5)
    hist = train(tiny_llama(VOCAB), rows, _cfg(steps=3, batch_size=2), progress=False)
    # 2 rows of 10 tokens: 18 scored, ceil(0.6 * 18) = 11 kept
    assert [h["kept"] for h in hist] == [11 / 18] * 3
    assert {"loss", "loss_all", "threshold", "lr", "tok_per_s"} <= hist[0].keys()


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_cli_train_resume_matches_uninterrupted(tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    tok = make_tokenizer(300)
    ref = tmp_path / "ref"
    tiny_llama(len(tok), seed=3).save_pretrained(ref)
    tok.save_pretrained(ref)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:40]))
    assert main(["score", "--ref-model", str(ref), "--corpus", str(corpus), "--out", str(tmp_path / "scored"),
                 "--seq-len", "32", "--no-progress"]) == 0  # fmt: skip
    common = ["train", "--data", str(tmp_path / "scored"), "--config", str(ref), "--steps", "5", "--batch-size", "4",
              "--warmup-steps", "1", "--keep-ratio", "0.6", "--seed", "1", "--no-progress"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stop-at", "2"]) == 0
    assert not (tmp_path / "b" / "model").exists()
    assert main([*common, "--out", str(tmp_path / "b"), "--resume", "--keep-ratio", "0.5"]) == 2  # another config
    assert "cannot resume" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model" / "tokenizer.json").is_file()
