"""`causal_lm_loss` against the models' own losses, SLM against the reference backend, the Trainer."""

from __future__ import annotations

import pytest
import torch
from pipeline_fixtures import one_thread, random_rows, tiny_llama
from torch import nn

from rho_fused import fused_selective_loss
from rho_fused.hf import causal_lm_loss, final_hidden_states, kept_count, shift_left

V = 97


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _model(kind: str):
    import transformers as tr

    common = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    if kind == "llama":
        return tr.LlamaForCausalLM(tr.LlamaConfig(**common))
    if kind == "llama-untied":
        return tr.LlamaForCausalLM(tr.LlamaConfig(**common, tie_word_embeddings=False))
    if kind == "mistral":
        return tr.MistralForCausalLM(tr.MistralConfig(**common, sliding_window=None))
    if kind == "qwen2":
        return tr.Qwen2ForCausalLM(tr.Qwen2Config(**common))
    if kind == "gemma2-softcap":
        return tr.Gemma2ForCausalLM(tr.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0))
    if kind == "granite-logits-scaling":
        return tr.GraniteForCausalLM(tr.GraniteConfig(**common, logits_scaling=4.0))
    if kind == "cohere-logit-scale":
        return tr.CohereForCausalLM(tr.CohereConfig(**common, logit_scale=0.3))
    if kind == "gpt2":
        cfg = tr.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return tr.GPT2LMHeadModel(cfg)
    raise ValueError(kind)


def _padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5] = -100  # an ignored token inside a sequence
    return ids, mask, labels


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


KINDS = ["llama", "llama-untied", "mistral", "qwen2", "gemma2-softcap", "granite-logits-scaling", "cohere-logit-scale",
         "gpt2"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_plain_loss_and_grads_equal_models_own(kind: str) -> None:
    model = _model(kind).eval()
    ids, mask, labels = _padded_batch()
    own = model(ids, attention_mask=mask, labels=labels).loss
    own.backward()
    own_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    ours = causal_lm_loss(model, ids, labels, attention_mask=mask)
    ours.backward()
    ours_grads = _grads(model)

    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
    assert ours_grads.keys() == own_grads.keys()
    for name in own_grads:
        torch.testing.assert_close(ours_grads[name], own_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_head_with_bias() -> None:
    model = _model("llama-untied").eval()
    model.lm_head = nn.Linear(32, V, bias=True)
    nn.init.normal_(model.lm_head.bias, std=0.5)
    ids, mask, labels = _padded_batch(1)
    own = model(ids, attention_mask=mask, labels=labels).loss
    ours = causal_lm_loss(model, ids, labels, attention_mask=mask)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, model.lm_head.bias)
    (g_own,) = torch.autograd.grad(model(ids, attention_mask=mask, labels=labels).loss, model.lm_head.bias)
    torch.testing.assert_close(g_ours, g_own, rtol=1e-4, atol=1e-7)


def test_logits_are_never_computed() -> None:
    model = _model("llama").eval()
    ids, mask, labels = _padded_batch()
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        causal_lm_loss(
            model, ids, labels, attention_mask=mask, ref_loss=torch.rand(ids.shape), keep_ratio=0.5
        ).backward()
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_slm_matches_reference_backend_on_the_same_hidden_states(scope: str) -> None:
    model = _model("llama").eval()
    ids, mask, labels = _padded_batch(2)
    ref_loss = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) * 5

    loss, stats = causal_lm_loss(model, ids, labels, attention_mask=mask, ref_loss=ref_loss, keep_ratio=0.6,
                                 scope=scope, return_stats=True)  # fmt: skip
    loss.backward()
    ours = _grads(model)
    model.zero_grad(set_to_none=True)

    # the oracle: the reference backend on the body's hidden states, targets and ref_loss shifted by hand
    hidden = final_hidden_states(model, ids, mask)
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    shifted_ref = torch.cat([ref_loss[:, 1:], torch.zeros(3, 1)], dim=1)
    oracle, ostats = fused_selective_loss(hidden, model.lm_head.weight, targets, shifted_ref, keep_ratio=0.6,
                                          scope=scope, backend="reference", return_stats=True)  # fmt: skip
    oracle.backward()
    theirs = _grads(model)

    torch.testing.assert_close(loss, oracle, rtol=1e-5, atol=1e-6)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    # stats come back aligned with labels: kept[b, t] is about labels[b, t]
    assert torch.equal(stats.kept[:, 1:], ostats.kept[:, :-1])
    assert not stats.kept[:, 0].any()
    assert not stats.kept[labels == -100].any()
    torch.testing.assert_close(stats.excess[:, 1:], ostats.excess[:, :-1])
    assert int(stats.n_kept.sum()) == kept_count(labels, 0.6, scope=scope)
    assert int(stats.kept.sum()) == kept_count(labels, 0.6, scope=scope)


def test_keep_ratio_one_with_ref_loss_is_plain_loss() -> None:
    model = _model("gpt2").eval()
    ids, mask, labels = _padded_batch(4)
    plain = causal_lm_loss(model, ids, labels, attention_mask=mask)
    with_ref = causal_lm_loss(model, ids, labels, attention_mask=mask, ref_loss=torch.rand(ids.shape), keep_ratio=1.0)
    torch.testing.assert_close(with_ref, plain)


def test_kept_count_is_exact() -> None:
    labels = torch.zeros(2, 11, dtype=torch.long)  # 10 scored tokens per row after the shift
    assert kept_count(labels, 0.6) == 12  # ceil(0.6 * 20), not 13
    assert kept_count(labels, 0.7, scope="sequence") == 14  # 7 + 7
    labels[1, 1:] = -100
    assert kept_count(labels, 0.01, scope="sequence") == 1  # at least 1 where a row has tokens, 0 where none
    with pytest.raises(ValueError, match="scope"):
        kept_count(labels, 0.5, scope="global")  # needs the other ranks' counts


def test_shape_errors_name_the_argument() -> None:
    model = _model("llama")
    ids, mask, labels = _padded_batch()
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(model, ids, labels[:, :-1])
    with pytest.raises(ValueError, match="ref_loss"):
        causal_lm_loss(model, ids, labels, ref_loss=torch.rand(3, 5), keep_ratio=0.5)


def test_shift_left_aligns_targets_with_hidden_states() -> None:
    x = torch.tensor([[1, 2, 3]])
    assert shift_left(x, -100).tolist() == [[2, 3, -100]]


# --- Trainer integration ---------------------------------------------------------------------------


def _manual_grads(model, rows, keep_ratio):
    """Gradient of sum(ce of kept tokens over all rows) / (kept tokens over all rows), scope=sequence."""
    from rho_fused.data import pad_batch

    model.zero_grad(set_to_none=True)
    batch = pad_batch(rows)
    n_keep = kept_count(batch["labels"], keep_ratio, scope="sequence")
    loss = causal_lm_loss(
        model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
        ref_loss=batch["ref_loss"], keep_ratio=keep_ratio, scope="sequence", reduction="sum",
    )  # fmt: skip
    (loss / n_keep).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("average_over_accumulation", [True, False])
def test_trainer_normalises_accumulation_by_kept_tokens(tmp_path, average_over_accumulation: bool) -> None:
    import datasets
    from transformers import TrainingArguments

    from rho_fused.hf_trainer import SelectiveTrainer

    rows = random_rows(4, 50, lengths=(4, 15), seed=5)
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    model = tiny_llama(50, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_grads = _manual_grads(model, rows, 0.5)

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        max_grad_norm=0.0, report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = SelectiveTrainer(
        model=model, args=args, train_dataset=ds, keep_ratio=0.5, scope="sequence",
        average_over_accumulation=average_over_accumulation,
        optimizers=(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0)),
    )  # fmt: skip
    trainer.train()
    step = {n: before[n] - p.detach() for n, p in model.named_parameters()}  # = lr * grad = grad
    match = all(torch.allclose(step[n], expected_grads[n], rtol=1e-4, atol=1e-6) for n in step)
    # kept-token normalisation over the accumulated batch reproduces the one-big-batch gradient;
    # the per-micro-batch mean does not (the micro-batches keep different numbers of tokens)
    assert match == average_over_accumulation


def test_trainer_evaluates_plain_loss_and_keeps_ref_loss_column(tmp_path) -> None:
    import datasets
    from transformers import TrainingArguments

    from rho_fused.data import pad_batch
    from rho_fused.hf_trainer import SelectiveTrainer

    rows = random_rows(3, 50, lengths=(6, 12), seed=6)
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    model = tiny_llama(50, seed=2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to="none", use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, keep_ratio=0.6)
    assert "ref_loss" in trainer._remove_unused_columns(ds).column_names
    metrics = trainer.evaluate()
    b = pad_batch(rows)
    with torch.no_grad():
        own = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert metrics["eval_loss"] == pytest.approx(float(own), rel=1e-5)


def test_trainer_refuses_slm_without_ref_loss(tmp_path) -> None:
    import datasets
    from transformers import TrainingArguments

    from rho_fused.hf_trainer import SelectiveTrainer

    rows = random_rows(2, 50, seed=7, ref=False)
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = SelectiveTrainer(model=tiny_llama(50), args=args, train_dataset=ds, keep_ratio=0.6)
    with pytest.raises(ValueError, match="ref_loss"):
        trainer.train()


def test_trainer_global_scope_on_one_process_is_batch_scope(tmp_path) -> None:
    """scope="global" over a single process is scope="batch": the same step, no process group needed."""
    import datasets
    from transformers import TrainingArguments

    from rho_fused.hf_trainer import SelectiveTrainer

    rows = random_rows(4, 50, lengths=(4, 15), seed=8)
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    weights = []
    for scope in ("global", "batch"):
        model = tiny_llama(50, seed=1)
        args = TrainingArguments(
            output_dir=str(tmp_path / scope), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=1, report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
            disable_tqdm=True, seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        SelectiveTrainer(model=model, args=args, train_dataset=ds, keep_ratio=0.5, scope=scope).train()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    assert not all(torch.equal(weights[0][n], p) for n, p in tiny_llama(50, seed=1).named_parameters())
    with pytest.raises(ValueError, match="scope='local'"):
        SelectiveTrainer(model=tiny_llama(50), args=args, train_dataset=ds, scope="local")


def test_kept_count_global_sums_over_the_process_group(tmp_path) -> None:
    """One gloo rank: the global count is the batch count (the 2-rank case runs in test_torchrun)."""
    import torch.distributed as dist

    labels = torch.zeros(2, 11, dtype=torch.long)
    labels[1, 4:] = -100
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert kept_count(labels, 0.6, scope="global") == kept_count(labels, 0.6) == 8  # ceil(0.6 * 13)
    finally:
        dist.destroy_process_group()


def test_head_inputs_fold_the_logit_scale_into_the_bias_too():
    """``scale * (h @ W.T + b)``: a head with both a bias and a logit scale (Granite-style ``logits_scaling``)."""
    from pipeline_fixtures import tiny_llama

    from rho_fused.hf import final_hidden_states, head_inputs

    model = tiny_llama(40, seed=2)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, 40, bias=True)
    torch.nn.init.normal_(model.lm_head.bias)
    model.config.logits_scaling = 4.0  # logits / 4
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        hidden, weight, bias, _ = head_inputs(model, ids)
        expected = model.lm_head(final_hidden_states(model, ids)) / 4.0
        torch.testing.assert_close(hidden @ weight.T + bias, expected)
