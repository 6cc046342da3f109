"""The online reference equals scoring first; selection statistics reach the logs and TensorBoard."""

from __future__ import annotations

import math

import pytest
import torch
from pipeline_fixtures import one_thread, random_rows, tiny_llama

from rho_fused.data import pad_batch
from rho_fused.hf import causal_lm_loss, kept_count
from rho_fused.online_ref import reference_losses
from rho_fused.report import load_history, write_report
from rho_fused.scoring import score_rows
from rho_fused.selection_log import SelectionLog, scored_mask
from rho_fused.train_loop import TrainConfig, train

VOCAB = 60


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _scored(rows, ref):
    """``rows`` with the ``ref_loss`` that `rho-fused score` computes (batched by length, 4 rows a batch)."""
    ref_loss = score_rows(ref, [r["input_ids"] for r in rows], batch_size=4, progress=False)
    return [{"input_ids": r["input_ids"], "ref_loss": x} for r, x in zip(rows, ref_loss, strict=True)]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_reference_losses_are_what_scoring_stores() -> None:
    rows = random_rows(7, VOCAB, seed=11, ref=False)
    ref = tiny_llama(VOCAB, seed=3)
    scored = _scored(rows, ref)
    b = pad_batch(rows[2:6])  # another batching than scoring's: padded to this batch's longest row
    online = reference_losses(ref, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
    assert online.dtype == torch.float32 and not online.requires_grad
    for j, row in enumerate(scored[2:6]):
        n = len(row["input_ids"])
        assert torch.equal(online[j, :n], torch.as_tensor(row["ref_loss"]))
        assert torch.all(online[j, n:] == 0)
    for mode in (True, False):  # scored in eval mode, the caller's mode restored
        ref.train(mode)
        reference_losses(ref, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
        assert ref.training is mode


@pytest.mark.parametrize("scope", ["global", "sequence"])
def test_train_loop_online_reference_equals_scoring_first(scope: str) -> None:
    rows = random_rows(10, VOCAB, seed=12, ref=False)
    ref = tiny_llama(VOCAB, seed=3)
    cfg = TrainConfig(steps=4, batch_size=3, accum_steps=2, lr=3e-3, min_lr=3e-4, warmup_steps=1, keep_ratio=0.6,
                      scope=scope, seed=5, log_every=1)  # fmt: skip
    offline, online = tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=0)
    hist_off = train(offline, _scored(rows, ref), cfg, progress=False)
    hist_on = train(online, rows, cfg, progress=False, ref_model=ref)

    # the same tokens kept, hence the same gradients: the weights are equal bit for bit
    assert _same_weights(offline, online)
    assert not _same_weights(offline, tiny_llama(VOCAB, seed=0))
    # ref_loss itself may differ in the last bits: scoring pads each row to another width than the
    # training batch, and the attention sums over a different number of (masked) keys
    assert [h.keys() for h in hist_on] == [h.keys() for h in hist_off]
    for on, off in zip(hist_on, hist_off, strict=True):
        for key in on.keys() - {"tok_per_s"}:
            assert on[key] == pytest.approx(off[key], rel=1e-6, abs=1e-7), key
    assert all(h["ref_loss"] > 0 and "excess_kept" in h and "excess_dropped" in h for h in hist_on)
    with pytest.raises(ValueError, match="one reference"):
        train(tiny_llama(VOCAB), _scored(rows, ref), cfg, progress=False, ref_model=ref)


def _trainer(tmp_path, model, ds, **kw):
    from transformers import TrainingArguments

    from rho_fused.hf_trainer import SelectiveTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(ds), max_steps=2, learning_rate=1e-2,
        report_to=kw.pop("report_to", "none"), use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return SelectiveTrainer(model=model, args=args, train_dataset=ds, keep_ratio=0.5, scope="sequence", **kw)


def test_trainer_online_reference_equals_scoring_first(tmp_path) -> None:
    import datasets

    rows = random_rows(6, VOCAB, lengths=(5, 14), seed=13, ref=False)
    ref = tiny_llama(VOCAB, seed=3)
    plain = datasets.Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in rows])
    scored = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in _scored(rows, ref)])
    offline, online = tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=0)
    _trainer(tmp_path / "off", offline, scored).train()
    t = _trainer(tmp_path / "on", online, plain, ref_model=ref)
    t.train()
    assert _same_weights(offline, online)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with pytest.raises(ValueError, match="ref_loss"):  # two references at once
        _trainer(tmp_path / "both", tiny_llama(VOCAB), scored, ref_model=ref).train()
    with pytest.raises(ValueError, match="either ref_model or self_reference"):
        _trainer(tmp_path / "both", tiny_llama(VOCAB), plain, ref_model=ref, self_reference=True)


def test_trainer_logs_selection_statistics_to_tensorboard(tmp_path, monkeypatch) -> None:
    import datasets
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = random_rows(6, VOCAB, lengths=(5, 14), seed=14)
    sources = ["web", "code", "web", "web", "code", "web"]
    ds = datasets.Dataset.from_list(
        [{**{k: v.tolist() for k, v in r.items()}, "source": s} for r, s in zip(rows, sources, strict=True)]
    )
    model = tiny_llama(VOCAB, seed=0)
    # expected first log line: the whole dataset is the batch of step 1, seen by the initial weights
    b = pad_batch(rows)
    with torch.no_grad():
        _, stats = causal_lm_loss(
            model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"], ref_loss=b["ref_loss"],
            keep_ratio=0.5, scope="sequence", return_stats=True,
        )  # fmt: skip
    valid = scored_mask(b["labels"])
    kept = stats.kept & valid
    n_keep = kept_count(b["labels"], 0.5, scope="sequence")
    assert int(kept.sum()) == n_keep
    rows_of = {s: [i for i, x in enumerate(sources) if x == s] for s in ("web", "code")}
    by_source = {s: (int(kept[idx].sum()), int(valid[idx].sum())) for s, idx in rows_of.items()}
    expected = {
        "slm/kept_fraction": n_keep / int(valid.sum()),
        "slm/excess_kept": float(stats.excess[kept].double().mean()),
        "slm/excess_dropped": float(stats.excess[valid & ~kept].double().mean()),
        "slm/ref_loss": float(b["ref_loss"][valid].double().mean()),
        "slm/threshold": float(stats.threshold.min()),
        "slm/kept_fraction/web": by_source["web"][0] / by_source["web"][1],
        "slm/kept_fraction/code": by_source["code"][0] / by_source["code"][1],
    }
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # where the Trainer's callback writes
    trainer = _trainer(tmp_path, model, ds, report_to="tensorboard")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for key, value in expected.items():
        assert logged[0][key] == pytest.approx(value, abs=2e-6), key
    assert logged[1]["slm/ref_loss"] == pytest.approx(expected["slm/ref_loss"], abs=2e-6)  # same rows, same ref
    assert logged[1]["slm/excess_kept"] != logged[0]["slm/excess_kept"]  # the model moved

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in expected:
        assert f"train/{key}" in tags, (key, tags)
    first = events.Scalars("train/slm/kept_fraction")[0]
    assert first.step == 1 and first.value == pytest.approx(expected["slm/kept_fraction"], rel=1e-6)

    # the report reads the Trainer's log (trainer_state.json) under the loop's names
    trainer.save_state()
    history = load_history(tmp_path)
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert history[0]["kept_fraction/web"] == pytest.approx(expected["slm/kept_fraction/web"])
    assert write_report(tmp_path)["curves"].is_file()


def test_selection_log_sums_micro_batches() -> None:
    """Two micro-batches logged together: the fractions are over both, not the mean of the two."""
    log = SelectionLog()
    model = tiny_llama(VOCAB, seed=1)
    totals = {"kept": 0, "valid": 0}
    for seed, n in ((1, 2), (2, 3)):
        b = pad_batch(random_rows(n, VOCAB, seed=seed))
        with torch.no_grad():
            _, stats = causal_lm_loss(model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"],
                                      ref_loss=b["ref_loss"], keep_ratio=0.3, return_stats=True)  # fmt: skip
        log.add(stats, b["labels"], b["ref_loss"])
        totals["kept"] += int(stats.n_kept)
        totals["valid"] += int(stats.n_valid)
    summary = log.summary()
    assert summary["kept_fraction"] == totals["kept"] / totals["valid"]
    assert math.isfinite(summary["threshold"]) and summary["excess_kept"] >= summary["threshold"]
    assert summary["excess_dropped"] <= summary["threshold"]
    log.reset()
    assert log.summary() == {}


def test_reference_runs_in_the_batch_precision() -> None:
    """Under the training step's autocast the reference computes in bf16, as the model does."""
    rows = random_rows(3, VOCAB, seed=15, ref=False)
    ref = tiny_llama(VOCAB, seed=3)
    b = pad_batch(rows)
    fp32 = reference_losses(ref, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = reference_losses(ref, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
    assert bf16.dtype == torch.float32  # ref_loss is always fp32
    assert not torch.equal(bf16, fp32)  # computed in bf16 ...
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)  # ... close to the fp32 numbers
    assert next(ref.parameters()).dtype == torch.float32  # the reference's weights are left as they are


def test_trajectory_resume_keeps_the_records_up_to_the_step(tmp_path) -> None:
    from rho_fused.selection_log import TokenTrajectory

    rows = random_rows(2, VOCAB, seed=16)
    model = tiny_llama(VOCAB, seed=1)
    first = TokenTrajectory(rows, tmp_path / "t.json", keep_ratio=0.5, every=1)
    for step in (1, 2, 3):
        first.record(model, step)
    first.save()
    again = TokenTrajectory(rows, tmp_path / "t.json", keep_ratio=0.5, every=1)
    again.resume(2)  # a run resumed from its step-2 checkpoint
    assert [r["step"] for r in again.records] == [1, 2]
    assert again.records[0] == first.records[0]
    with pytest.raises(ValueError, match="ref_loss"):
        TokenTrajectory(random_rows(1, VOCAB, ref=False), tmp_path / "u.json", keep_ratio=0.5)
