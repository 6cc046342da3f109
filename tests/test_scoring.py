"""Scoring: stored ref_loss equals token_losses of the reference; fingerprints; atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pipeline_fixtures import TEXTS, make_tokenizer, one_thread, tiny_llama

from rho_fused import token_losses
from rho_fused.cli import main
from rho_fused.data import pack_texts, split_rows
from rho_fused.hf import final_hidden_states
from rho_fused.scoring import (
    FingerprintMismatchError,
    load_scored,
    model_fingerprint,
    read_meta,
    score_corpus,
    tokenizer_fingerprint,
)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(300)


def _oracle(model, row: np.ndarray) -> np.ndarray:
    """token_losses of the reference model on one unpadded row, by the reference backend."""
    ids = torch.as_tensor(row, dtype=torch.long)[None]
    with torch.no_grad():
        hidden = final_hidden_states(model.eval(), ids)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    ce = token_losses(hidden, model.lm_head.weight, targets, backend="reference")[0]
    return torch.cat([torch.zeros(1), ce[:-1]]).numpy()  # aligned with the tokens: ref_loss[t] predicts row[t]


def test_round_trip_stores_token_losses(tmp_path, tokenizer) -> None:
    model = tiny_llama(len(tokenizer), seed=3)
    # rows of different lengths, so scoring batches have padding
    ids = [tokenizer(t)["input_ids"] for t in TEXTS[:20]]
    rows = split_rows(ids, 24)
    assert len({len(r) for r in rows}) > 1
    meta = score_corpus(model, tokenizer, rows, tmp_path / "scored", seq_len=24, batch_size=4, progress=False)
    ds, meta2 = load_scored(tmp_path / "scored", tokenizer)
    assert meta2 == meta
    assert len(ds) == len(rows) == meta["n_sequences"]
    for i, row in enumerate(rows):
        assert np.array_equal(ds[i]["input_ids"], row)
        np.testing.assert_allclose(ds[i]["ref_loss"], _oracle(model, row), rtol=1e-5, atol=1e-5)
    assert ds[0]["ref_loss"][0] == 0.0
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert meta["reference_fingerprint"] == model_fingerprint(model)
    assert meta["seq_len"] == 24


def test_fingerprints(tmp_path, tokenizer) -> None:
    model = tiny_llama(len(tokenizer), seed=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert model_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "m")) == model_fingerprint(model)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "m")) == tokenizer_fingerprint(tokenizer)
    other = tiny_llama(len(tokenizer), seed=4)
    assert model_fingerprint(other) != model_fingerprint(model)
    assert tokenizer_fingerprint(make_tokenizer(280)) != tokenizer_fingerprint(tokenizer)


def test_fingerprint_mismatch_is_refused(tmp_path, tokenizer) -> None:
    model = tiny_llama(len(tokenizer), seed=3)
    rows = pack_texts(TEXTS[:10], tokenizer, 16)
    score_corpus(model, tokenizer, rows, tmp_path / "scored", seq_len=16, progress=False)
    other = make_tokenizer(280)
    with pytest.raises(FingerprintMismatchError) as err:
        load_scored(tmp_path / "scored", other)
    msg = str(err.value)
    assert tokenizer_fingerprint(tokenizer) in msg and tokenizer_fingerprint(other) in msg


def test_cli_score_then_train_refuses_other_tokenizer(tmp_path, tokenizer, capsys) -> None:
    ref = tmp_path / "ref"
    tiny_llama(len(tokenizer), seed=3).save_pretrained(ref)
    tokenizer.save_pretrained(ref)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:30]))
    argv = ["score", "--ref-model", str(ref), "--corpus", str(corpus), "--out", str(tmp_path / "scored"),
            "--seq-len", "32", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    meta = read_meta(tmp_path / "scored")
    assert meta["n_sequences"] == len(pack_texts(TEXTS[:30], tokenizer, 32))
    # an existing output is not replaced without --overwrite
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err

    other = tmp_path / "other_tok"
    make_tokenizer(280).save_pretrained(other)
    code = main(["train", "--data", str(tmp_path / "scored"), "--config", str(ref), "--tokenizer", str(other),
                 "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert meta["tokenizer_fingerprint"] in err and str(ref) in err and str(other) in err
    assert not (tmp_path / "run").exists()


def test_interrupted_scoring_keeps_the_previous_output_and_resumes(tmp_path, tokenizer, monkeypatch) -> None:
    from rho_fused.shards import ShardStore

    model = tiny_llama(len(tokenizer), seed=3)
    rows = pack_texts(TEXTS[:10], tokenizer, 16)
    score_corpus(model, tokenizer, rows, tmp_path / "scored", seq_len=16, progress=False)
    before = sorted(p.name for p in (tmp_path / "scored").iterdir())

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardStore, "publish", boom)  # dies with every shard written, before the rename
    with pytest.raises(KeyboardInterrupt):
        score_corpus(model, tokenizer, rows[:3], tmp_path / "scored", seq_len=16, overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "scored").iterdir()) == before  # the previous output is intact
    assert read_meta(tmp_path / "scored")["n_sequences"] == len(rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored", "scored.partial"]  # the interrupted run's shards
    # without --resume the shards are not thrown away; with it the run completes
    with pytest.raises(FileExistsError, match="--resume"):
        score_corpus(model, tokenizer, rows[:3], tmp_path / "scored", seq_len=16, overwrite=True, progress=False)
    monkeypatch.undo()
    meta = score_corpus(
        model, tokenizer, rows[:3], tmp_path / "scored", seq_len=16, overwrite=True, resume=True, progress=False
    )
    assert read_meta(tmp_path / "scored") == meta and meta["n_sequences"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["scored"]  # nothing left behind


def test_corpus_formats(tmp_path, tokenizer) -> None:
    import datasets

    from rho_fused.stream import CorpusSource, block_rows

    def rows_of(path):
        return [r for b in CorpusSource(path).blocks(1000) for r in block_rows(b, tokenizer, seq_len)]

    # pre-tokenized rows are kept as they are, cut at seq_len (pieces under 2 tokens dropped)
    datasets.Dataset.from_dict({"input_ids": [list(range(10)), [5, 6, 7], [9]]}).save_to_disk(tmp_path / "tok")
    seq_len = 4
    assert [r.tolist() for r in rows_of(tmp_path / "tok")] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [5, 6, 7]]
    # a text file is one document, tokenized, ended with EOS and packed
    (tmp_path / "doc.txt").write_text(TEXTS[0] + "\n" + TEXTS[1])
    seq_len = 8
    stream = tokenizer(TEXTS[0] + "\n" + TEXTS[1])["input_ids"] + [tokenizer.eos_token_id]
    assert [t for r in rows_of(tmp_path / "doc.txt") for t in r.tolist()] == stream[: len(stream) // 8 * 8]
    datasets.Dataset.from_dict({"other": ["x"]}).save_to_disk(tmp_path / "other")
    with pytest.raises(ValueError, match="'input_ids' or a 'text' column"):
        CorpusSource(tmp_path / "other")
