"""``rho-fused demo``: the Rho-1 pipeline end to end on CPU, on CHAMP's math text, with no network.

1. Split CHAMP by problem (`rho_fused.champ`): human-written text of the training problems,
   held-out problems' human-written solutions, model-written replies (the noisy corpus).
2. Train a byte-level BPE tokenizer (`tokenizers`) on the training text.
3. Train a tiny Llama reference model on the human-written training text.
4. Score the noisy corpus with it (`rho_fused.scoring`: per-token ``ref_loss``, no logits).
5. From one initialisation, train plain causal LM (keep 1.0) and SLM (keep 0.6) for the same
   steps on the same batches of the noisy corpus (`rho_fused.train_loop`).
6. Evaluate both on the held-out human-written solutions (and on held-out model-written text);
   print a table; write ``metrics.json``, ``loss_curves.png`` and ``tokens.html`` to ``--out``.
"""

from __future__ import annotations

import copy
import html
import platform
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_json, write_text
from .champ import load_champ
from .data import pack_texts, split_rows
from .hf import causal_lm_loss
from .scoring import load_scored, score_corpus
from .train_loop import TrainConfig, evaluate, save_model, train


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run."""

    vocab_size: int = 2048
    seq_len: int = 128
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    batch_size: int = 16
    ref_steps: int = 300
    steps: int = 600
    lr: float = 2e-3
    keep_ratio: float = 0.6
    eval_every: int = 50
    tokenizer_docs: int = 4000  # model-written documents the tokenizer also trains on
    model_eval_docs: int = 400  # held-out model-written documents evaluated on
    threads: int = 1


DEFAULT = DemoConfig()
QUICK = DemoConfig(
    vocab_size=512,
    seq_len=64,
    hidden=64,
    layers=1,
    heads=2,
    batch_size=8,
    ref_steps=40,
    steps=60,
    eval_every=20,
    tokenizer_docs=300,
    model_eval_docs=40,
)


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a `transformers` fast tokenizer."""
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
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(cfg: DemoConfig, vocab_size: int, seed: int) -> Any:
    """A freshly initialised tiny Llama (tied embeddings), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sample_to_tokens(docs: list[str], n_tokens: int, chars_per_token: float, seed: int) -> list[str]:
    """A seeded random sample of ``docs`` holding about ``n_tokens`` tokens."""
    pool = list(docs)
    random.Random(seed).shuffle(pool)
    out, chars = [], 0
    for d in pool:
        if chars >= n_tokens * chars_per_token:
            break
        out.append(d)
        chars += len(d)
    return out


def doc_rows(docs: list[str], tokenizer: Any, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Each document tokenized (ending with EOS) and cut into rows of at most ``seq_len`` tokens."""
    ids = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    return [{"input_ids": r} for r in split_rows(ids, seq_len)]


def token_page(model: Any, tokenizer: Any, rows: list[dict[str, np.ndarray]], keep_ratio: float) -> str:
    """HTML: tokens of ``rows`` coloured by excess loss under ``model``; dropped tokens greyed out."""
    batch_ids = torch.as_tensor(np.stack([r["input_ids"] for r in rows]), dtype=torch.long)
    ref = torch.as_tensor(np.stack([r["ref_loss"] for r in rows]), dtype=torch.float32)
    with torch.no_grad():
        _, stats = causal_lm_loss(
            model.eval(), batch_ids, batch_ids, ref_loss=ref, keep_ratio=keep_ratio, scope="sequence", return_stats=True
        )
    scale = float(stats.excess.abs().quantile(0.95)) or 1.0
    parts = [
        "<!doctype html><meta charset='utf-8'><title>rho-fused demo: kept and dropped tokens</title>",
        "<style>body{font:14px/1.8 monospace;max-width:60em;margin:2em auto}p.t{white-space:pre-wrap;"
        "border-bottom:1px solid #ccc;padding-bottom:1em}.k{border-bottom:2px solid #222}.d{color:#999}</style>",
        "<h1>Selective language modelling: which tokens are kept</h1>",
        f"<p>Model-written math text from CHAMP (the noisy training corpus), scored by the reference model "
        f"trained on human-written solutions. Background: the excess loss of each token, the SLM model's loss "
        f"(at the end of its training) minus the reference model's; <span style='background:rgba(40,160,40,.6)'>"
        f"green: positive</span> (the model still has to learn what the reference knows), "
        f"<span style='background:rgba(220,60,60,.6)'>red: negative</span>, stronger for larger |excess|. "
        f"<span class='k'>Underlined black</span>: kept (the top {keep_ratio:.0%} of each sequence by excess); "
        f"<span class='d'>grey</span>: dropped, no gradient. Hover a token for its numbers.</p>",
    ]
    for b in range(batch_ids.shape[0]):
        spans = []
        for t in range(batch_ids.shape[1]):
            text = html.escape(tokenizer.decode([int(batch_ids[b, t])]))
            if t == 0:
                spans.append(f"<span class='d' title='first token: not predicted'>{text}</span>")
                continue
            ex, kept = float(stats.excess[b, t]), bool(stats.kept[b, t])
            alpha = min(1.0, abs(ex) / scale) * 0.7
            colour = f"rgba(40,160,40,{alpha:.2f})" if ex > 0 else f"rgba(220,60,60,{alpha:.2f})"
            tip = f"loss {float(stats.ce[b, t]):.2f}, ref {float(ref[b, t]):.2f}, excess {ex:+.2f}, "
            tip += "kept" if kept else "dropped"
            spans.append(
                f"<span class='{'k' if kept else 'd'}' style='background:{colour}' title='{tip}'>{text}</span>"
            )
        parts.append("<p class='t'>" + "".join(spans) + "</p>")
    return "\n".join(parts) + "\n"


def plot_curves(path: Path, runs: dict[str, list[dict]], ref_eval: float) -> None:
    """Training loss (every token of the noisy batch) and held-out human-written loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in runs.items():
        a.plot([h["step"] for h in hist], [h["loss_all"] for h in hist], label=name)
        ev = [h for h in hist if "eval_loss" in h]
        b.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], marker="o", label=name)
    b.axhline(ref_eval, color="grey", linestyle="--", label="reference model")
    a.set(title="training loss, all tokens (model-written text)", xlabel="step", ylabel="cross-entropy (nats)")
    b.set(title="held-out human-written solutions", xlabel="step", ylabel="cross-entropy (nats)")
    a.legend()
    b.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run_demo(
    out: str | Path, *, quick: bool = False, seed: int = 0, threads: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the whole demo into ``out`` and return its metrics (also written to ``out/metrics.json``)."""
    cfg = QUICK if quick else DEFAULT
    if threads is not None:
        cfg = replace(cfg, threads=threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # tiny matmuls: one thread beats two that fight over shared cores
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str, t: float) -> None:
        times[name] = round(time.perf_counter() - t, 2)
        if progress:
            print(f"[demo] {name}: {times[name]:.1f}s", flush=True)

    try:
        # 1-2. data and tokenizer
        t = time.perf_counter()
        champ = load_champ()
        tokens_needed = cfg.steps * cfg.batch_size * cfg.seq_len
        noisy_docs = sample_to_tokens(champ.model_train, int(tokens_needed * 1.1), 2.6, seed=1)
        tokenizer = train_tokenizer(champ.human_train + noisy_docs[: cfg.tokenizer_docs], cfg.vocab_size)
        tokenizer.save_pretrained(out / "tokenizer")
        human_rows = [{"input_ids": r} for r in pack_texts(champ.human_train, tokenizer, cfg.seq_len)]
        noisy_rows = pack_texts(noisy_docs, tokenizer, cfg.seq_len)[: tokens_needed // cfg.seq_len]
        eval_rows = doc_rows(champ.human_eval, tokenizer, cfg.seq_len)
        model_eval_docs = sample_to_tokens(champ.model_eval, 10**12, 1.0, seed=2)[: cfg.model_eval_docs]
        model_eval_rows = doc_rows(model_eval_docs, tokenizer, cfg.seq_len)
        lap("data and tokenizer", t)

        # 3. the reference model, on human-written text
        t = time.perf_counter()
        base = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr / 10, seed=seed, log_every=10)
        ref_cfg = replace(base, steps=cfg.ref_steps, warmup_steps=max(1, cfg.ref_steps // 10), keep_ratio=1.0)
        reference = tiny_llama(cfg, len(tokenizer), seed=seed + 1)
        ref_hist = train(reference, human_rows, ref_cfg, progress=progress, desc="reference")
        save_model(reference, tokenizer, out / "reference")
        lap("reference training", t)

        # 4. score the noisy corpus (then read it back, checking the tokenizer's fingerprint)
        t = time.perf_counter()
        score_corpus(
            reference,
            tokenizer,
            noisy_rows,
            out / "scored",
            seq_len=cfg.seq_len,
            batch_size=32,
            docs_per_block=len(noisy_rows),  # one block: the batches (and numbers) of the in-memory scorer it replaced
            overwrite=True,
            progress=progress,
        )
        scored, meta = load_scored(out / "scored", tokenizer)
        scored_rows = [
            {"input_ids": scored[i]["input_ids"], "ref_loss": scored[i]["ref_loss"]} for i in range(len(scored))
        ]
        lap("scoring", t)

        # 5-6. CLM and SLM from the same initialisation, the same batches; evaluation
        init = tiny_llama(cfg, len(tokenizer), seed=seed + 2)
        train_cfg = replace(base, steps=cfg.steps, warmup_steps=max(1, cfg.steps // 20), eval_every=cfg.eval_every)
        runs, results = {}, {}
        for name, keep in (("CLM", 1.0), (f"SLM {cfg.keep_ratio:g}", cfg.keep_ratio)):
            t = time.perf_counter()
            model = copy.deepcopy(init)
            run_cfg = replace(train_cfg, keep_ratio=keep)
            hist = train(
                model,
                scored_rows,
                run_cfg,
                out_dir=out / "runs" / name.split()[0],
                eval_data=eval_rows,
                progress=progress,
                desc=name,
            )
            runs[name] = hist
            results[name] = {
                "keep_ratio": keep,
                "held_out_human_loss": hist[-1]["eval_loss"],
                "held_out_model_written_loss": evaluate(model, model_eval_rows, batch_size=cfg.batch_size),
                "kept_fraction": float(np.mean([h["kept"] for h in hist])),
                "train_loss_all_tokens": hist[-1]["loss_all"],
                "train_seconds": round(time.perf_counter() - t, 2),
            }
            lap(f"training {name}", t)
            if keep < 1.0:
                slm_model = model
        ref_eval = evaluate(reference, eval_rows, batch_size=cfg.batch_size)
        ref_model_eval = evaluate(reference, model_eval_rows, batch_size=cfg.batch_size)

        # outputs
        t = time.perf_counter()
        plot_curves(out / "loss_curves.png", runs, ref_eval)
        page_rows = [scored_rows[i] for i in range(0, len(scored_rows), max(1, len(scored_rows) // 6))[:6]]
        write_text(out / "tokens.html", token_page(slm_model, tokenizer, page_rows, cfg.keep_ratio))
        lap("plots and page", t)
    finally:
        torch.set_num_threads(threads_before)

    wall = time.perf_counter() - t_start
    names = list(results)
    winner = min(names, key=lambda n: results[n]["held_out_human_loss"])
    metrics = {
        "command": "rho-fused demo"
        + (" --quick" if quick else "")
        + (f" --seed {seed}" if seed else "")
        + (f" --threads {cfg.threads}" if cfg.threads != 1 else ""),
        "config": asdict(cfg),
        "seed": seed,
        "data": {
            "problems": champ.n_problems,
            "held_out_problems": champ.n_eval_problems,
            "human_train_tokens": int(sum(len(r["input_ids"]) for r in human_rows)),
            "noisy_train_tokens": int(meta["n_tokens"]),
            "held_out_human_tokens": int(sum(len(r["input_ids"]) for r in eval_rows)),
            "held_out_model_written_tokens": int(sum(len(r["input_ids"]) for r in model_eval_rows)),
        },
        "reference": {
            "held_out_human_loss": ref_eval,
            "held_out_model_written_loss": ref_model_eval,
            "mean_ref_loss_on_noisy_corpus": meta["mean_ref_loss"],
            "final_train_loss": ref_hist[-1]["loss"],
        },
        "results": results,
        "winner_on_held_out_human": winner,
        "histories": runs,
        "seconds": times,
        "wall_seconds": round(wall, 1),
        "threads": cfg.threads,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    write_json(out / "metrics.json", metrics)
    print(format_table(metrics))
    return metrics


def format_table(m: dict[str, Any]) -> str:
    """The demo's result table, as Markdown."""
    lines = [
        "| model | held-out human-written loss | held-out model-written loss | kept fraction | train time |",
        "| --- | --- | --- | --- | --- |",
        f"| reference (human-written text) | {m['reference']['held_out_human_loss']:.4f} | "
        f"{m['reference']['held_out_model_written_loss']:.4f} | 1.00 | {m['seconds']['reference training']:.0f} s |",
    ]
    for name, r in m["results"].items():
        lines.append(
            f"| {name} | {r['held_out_human_loss']:.4f} | {r['held_out_model_written_loss']:.4f} | "
            f"{r['kept_fraction']:.2f} | {r['train_seconds']:.0f} s |"
        )
    lines.append("")
    lines.append(
        f"`{m['command']}`: {m['config']['steps']} steps of {m['config']['batch_size']} x {m['config']['seq_len']} "
        f"tokens each, {m['data']['noisy_train_tokens']} model-written training tokens, "
        f"{m['data']['held_out_human_tokens']} held-out human-written tokens; lower loss is better; "
        f"best on held-out human-written text: {m['winner_on_held_out_human']}; wall time {m['wall_seconds']:.0f} s "
        f"({m['threads']} torch thread{'s' if m['threads'] > 1 else ''})."
    )
    return "\n".join(lines)
