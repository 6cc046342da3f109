"""SelectiveSFTTrainer: TRL's own loss at keep 1.0, adapters-only training and a self-reference at keep 0.6."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import datasets
import peft  # trl and peft come with the dev extra: a missing one fails here, it is not skipped
import pytest
import torch
import trl
from pipeline_fixtures import make_tokenizer, one_thread, tiny_llama

from rho_fused.cli import main
from rho_fused.hf import kept_count
from rho_fused.online_ref import adapter_free_losses, reference_losses
from rho_fused.selection_log import TokenTrajectory
from rho_fused.trl import SelectiveSFTTrainer

# A chat template that marks the assistant's turns, as TRL's assistant_only_loss needs
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|endoftext|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_tokenizer(300)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _prompt_completion(n: int = 8):
    rows = [
        {"prompt": f"Problem {i}: add {i} and {i + 3}.", "completion": f" The sum is {2 * i + 3}."} for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def _conversations(n: int = 8):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i + 3}?"},
                {"role": "assistant", "content": f"It is {2 * i + 3}."},
            ]
        }
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


KINDS = {
    "completion_only": ({}, _prompt_completion),
    "assistant_only": ({"assistant_only_loss": True}, _conversations),
    "packing": ({"packing": True}, _prompt_completion),
    "padding_free": ({"padding_free": True, "max_length": None}, _prompt_completion),
}


def _config(tmp_path: Path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, max_length=64, logging_steps=1, seed=0, dataset_num_proc=None,
    )  # fmt: skip
    return trl.SFTConfig(**{**base, **kw})


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", list(KINDS))
def test_keep_one_is_trl_loss_and_gradients(tmp_path, tokenizer, kind: str) -> None:
    extra, make_data = KINDS[kind]
    ds = make_data()
    model = tiny_llama(len(tokenizer), seed=0)
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    trl_trainer = trl.SFTTrainer(model=theirs, args=_config(tmp_path, **extra), train_dataset=ds,
                                 processing_class=tokenizer)  # fmt: skip
    slm_trainer = SelectiveSFTTrainer(model=ours, args=_config(tmp_path, **extra), train_dataset=ds,
                                      processing_class=tokenizer, keep_ratio=1.0)  # fmt: skip
    batch = next(iter(trl_trainer.get_train_dataloader()))
    labels = batch["labels"]
    if kind in ("packing", "padding_free"):  # one row, sequences told apart by position_ids
        assert labels.shape[0] == 1 and "position_ids" in batch and "attention_mask" not in batch
        assert torch.all(labels[batch["position_ids"] == 0] == -100)
    else:  # the prompt (or the user's turn) is not trained on
        assert torch.all(labels[:, :3] == -100) and (labels != -100).any()
    n_items = (labels[:, 1:] != -100).sum()

    loss_trl = trl_trainer.compute_loss(theirs, dict(batch), num_items_in_batch=n_items)
    loss_trl.backward()
    loss_ours = slm_trainer.compute_loss(ours, dict(batch), num_items_in_batch=n_items)
    loss_ours.backward()
    assert float(loss_ours) == pytest.approx(float(loss_trl), rel=1e-6)
    g_trl, g_ours = _grads(theirs), _grads(ours)
    assert g_trl.keys() == g_ours.keys() and len(g_trl) == len(list(model.parameters()))
    for name in g_trl:
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=1e-5, atol=1e-7, msg=name)


def _lora_trainer(tmp_path: Path, tokenizer, model, **kw):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    args = _config(tmp_path, max_steps=2, learning_rate=5e-3, per_device_train_batch_size=8)
    return SelectiveSFTTrainer(model=model, args=args, train_dataset=_prompt_completion(), processing_class=tokenizer,
                               peft_config=lora, **kw)  # fmt: skip


def test_keep_point_six_trains_adapters_only_against_the_base_model(tmp_path, tokenizer) -> None:
    base = tiny_llama(len(tokenizer), seed=0)
    held_out = [
        {"input_ids": tokenizer(f"Problem {i}: add 1 and {i}. The sum is {i + 1}.")["input_ids"]} for i in (20, 21)
    ]
    trajectory = TokenTrajectory(held_out, tmp_path / "trajectory.json", keep_ratio=0.6, every=1, self_reference=True)
    trainer = _lora_trainer(tmp_path, tokenizer, copy.deepcopy(base), keep_ratio=0.6, trajectory=trajectory)
    model = trainer.model
    assert trainer.self_reference and hasattr(model, "disable_adapter")
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]

    # the self-reference is the base model: the same numbers as a separate copy of it
    own = adapter_free_losses(model, ids, labels, attention_mask=mask)
    torch.testing.assert_close(own, reference_losses(base, ids, labels, attention_mask=mask), rtol=1e-6, atol=1e-6)
    adapted = reference_losses(model, ids, labels, attention_mask=mask)
    assert not torch.allclose(own, adapted)  # the adapters change the loss: the excess is not zero

    # the fused backend against the reference backend: the loss and every adapter's gradient
    n_keep = kept_count(labels, 0.6)
    results = {}
    for backend in ("auto", "reference"):
        trainer.backend = backend
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_keep)
        loss.backward()
        results[backend] = (float(loss), _grads(model))
    trainer.backend = "auto"
    model.zero_grad(set_to_none=True)
    assert results["auto"][0] == pytest.approx(results["reference"][0], rel=1e-6)
    grads = results["auto"][1]
    assert grads and all("lora_" in n for n in grads)  # only the adapters get gradients
    for name, g in grads.items():
        torch.testing.assert_close(g, results["reference"][1][name], rtol=1e-5, atol=1e-7, msg=name)

    # two optimizer steps: the adapters move, the base weights (LM head included) do not
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.selection_log.reset()  # forget the two compute_loss calls above
    trainer._total_train_tokens = 0
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lm_head" in n for n in before) and not any("lm_head" in n for n in changed)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["slm/kept_fraction"] == pytest.approx(0.6, abs=0.05) for h in logged)
    tokens = int(batch["attention_mask"].sum())  # one batch of the 8 rows a step, as TRL counts them
    assert [h["num_tokens"] for h in logged] == [tokens, 2 * tokens]
    assert all(h["slm/excess_kept"] > h["slm/excess_dropped"] for h in logged)

    # the held-out sample, recorded at both steps against the adapters-off model; the run's report
    saved = json.loads((tmp_path / "trajectory.json").read_text())
    assert [r["step"] for r in saved["records"]] == [1, 2]
    first_ref = saved["records"][0]["ref_loss"]
    assert first_ref == saved["records"][1]["ref_loss"]  # the base model does not train
    trainer.save_state()  # trainer_state.json: the log the report reads
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "curves.png").is_file() and (tmp_path / "report" / "tokens.html").is_file()


def test_refusals(tmp_path, tokenizer) -> None:
    with pytest.raises(ValueError, match="needs a reference"):
        SelectiveSFTTrainer(model=tiny_llama(len(tokenizer)), args=_config(tmp_path),
                            train_dataset=_prompt_completion(), processing_class=tokenizer, keep_ratio=0.6)  # fmt: skip
    with pytest.raises(ValueError, match="self_reference=True needs a PEFT model"):
        SelectiveSFTTrainer(model=tiny_llama(len(tokenizer)), args=_config(tmp_path), self_reference=True,
                            train_dataset=_prompt_completion(), processing_class=tokenizer)  # fmt: skip
    ref = tiny_llama(len(tokenizer), seed=5)
    with pytest.raises(ValueError, match="scope='sequence'"):  # a packed row holds many sequences
        SelectiveSFTTrainer(model=tiny_llama(len(tokenizer)), args=_config(tmp_path, packing=True),
                            train_dataset=_prompt_completion(), processing_class=tokenizer, ref_model=ref,
                            scope="sequence")  # fmt: skip
    # a PEFT model with a separate reference: that reference, not the adapters-off model
    trainer = _lora_trainer(tmp_path, tokenizer, tiny_llama(len(tokenizer)), keep_ratio=0.6, ref_model=ref)
    assert not trainer.self_reference and trainer.ref_model is ref


def _readme_block(marker: str) -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", readme, re.S)
    assert found, f"README has no python block after <!-- {marker} -->"
    return found.group(1)


def test_readme_trl_example_runs(tmp_path, tokenizer, monkeypatch) -> None:
    """The README's TRL example, as written, with the hub's model, tokenizer and data replaced by tiny local
    ones, and its SFTConfig told to run 2 steps on the CPU in fp32 (TRL's default is bf16 on a GPU)."""
    import functools

    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama(len(tokenizer)))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _prompt_completion(16))
    cpu = dict(use_cpu=True, bf16=False, max_steps=2, logging_steps=1, disable_tqdm=True)
    monkeypatch.setattr(trl, "SFTConfig", functools.partial(trl.SFTConfig, **cpu))
    scope: dict = {}
    exec(compile(_readme_block("trl-example"), "README.md", "exec"), scope)
    trainer = scope["trainer"]
    assert isinstance(trainer, SelectiveSFTTrainer) and trainer.self_reference and trainer.state.global_step > 0
    assert any("slm/kept_fraction" in h for h in trainer.state.log_history)
