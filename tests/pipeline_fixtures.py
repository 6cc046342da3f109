"""Tiny models, tokenizers and corpora for the pipeline tests (built locally: nothing is downloaded)."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

TEXTS = [
    f"Problem {i}: find the sum of {i} and {i + 3}. Solution: {i} + {i + 3} = {2 * i + 3}, the answer is {2 * i + 3}."
    for i in range(120)
]


def make_tokenizer(vocab_size: int = 300, texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained on a few math sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=None, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def random_rows(n: int, vocab_size: int, lengths: tuple[int, int] = (5, 16), seed: int = 0, ref: bool = True):
    """Rows of random tokens of random lengths, with a random ``ref_loss``."""
    import numpy as np

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(*lengths)
        row = {"input_ids": np.asarray([rng.randrange(vocab_size) for _ in range(length)], dtype=np.int32)}
        if ref:
            row["ref_loss"] = np.asarray([rng.uniform(0, 6) for _ in range(length)], dtype=np.float32)
        rows.append(row)
    return rows


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny matmuls on shared cores: one thread is much faster and deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reference_workdir(root: Path, n_texts: int = 30) -> Path:
    """``root`` holding a tiny reference Llama with its tokenizer (``ref/``) and a text corpus (``corpus.jsonl``)."""
    tok = make_tokenizer(300)
    tiny_llama(len(tok), seed=3).save_pretrained(root / "ref")
    tok.save_pretrained(root / "ref")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:n_texts]))
    return root
