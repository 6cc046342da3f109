"""Training tokens/s with a scored corpus against the online reference (`train(ref_model=...)`).

    python bench/online_ref.py            # Llama d=256, 4 layers, V=8192, 8 x 256 tokens a step
    python bench/online_ref.py --quick    # a smaller model, for a smoke run

Both runs train the same model on the same rows with SLM at keep 0.6: "offline" reads ``ref_loss``
scored beforehand (`score_rows`, timed apart), "online" has a reference of the same size score
every micro-batch as it is drawn. Runs alternate within each repetition after a warm-up run of each;
medians are reported, with the rate a model expects: a training step's time plus one scoring
forward (timed by `score_rows`) per token. Writes ``bench/results/online-ref-<machine>-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rho_fused.scoring import score_rows
from rho_fused.train_loop import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"


def llama(seed: int, d: int, layers: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=int(d * 2.75), num_hidden_layers=layers,
        num_attention_heads=d // 64, num_key_value_heads=d // 64, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, layers, vocab, seq, batch, steps = (128, 2, 2048, 128, 4, 3) if args.quick else (256, 4, 8192, 256, 8, 6)

    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(0, vocab, seq, dtype=np.int32)} for _ in range(batch * steps)]
    ref = llama(1, d, layers, vocab).eval()
    t = time.perf_counter()
    scored_ref = score_rows(ref, [r["input_ids"] for r in rows], batch_size=batch, progress=False)
    score_s = time.perf_counter() - t
    scored = [{**r, "ref_loss": x} for r, x in zip(rows, scored_ref, strict=True)]
    cfg = TrainConfig(steps=steps, batch_size=batch, keep_ratio=0.6, warmup_steps=1, log_every=steps, seed=0)
    tokens = batch * seq * steps

    def run(online: bool) -> float:
        model = llama(0, d, layers, vocab)
        t = time.perf_counter()
        train(model, rows if online else scored, cfg, progress=False, ref_model=ref if online else None)
        return tokens / (time.perf_counter() - t)

    run(False), run(True)  # warm-up
    rates: dict[str, list[float]] = {"offline": [], "online": []}
    for _ in range(args.reps):
        rates["offline"].append(run(False))
        rates["online"].append(run(True))
    off, on = statistics.median(rates["offline"]), statistics.median(rates["online"])
    load = os.getloadavg()[0]  # the cores are shared: how busy they were
    expected = 1 / (1 / off + score_s / tokens)  # each token: a training step's time plus a scoring forward's

    machine = f"{platform.node() or 'cpu'}"
    date = datetime.date.today().isoformat()
    cmd = (
        "python bench/online_ref.py"
        + (" --quick" if args.quick else "")
        + f" --threads {args.threads} --reps {args.reps}"
    )
    lines = [
        f"# online reference, {date}",
        "",
        f"`{cmd}` on {cpu_name()} ({args.threads} torch threads), torch {torch.__version__}, fp32, backend auto.",
        f"Model and reference: Llama d={d}, {layers} layers, V={vocab}; {steps} steps of {batch} x {seq} tokens, "
        f"SLM keep 0.6. Medians of {args.reps} alternating repetitions after a warm-up run of each; "
        f"1-minute load average at the end: {load:.1f}.",
        "",
        "| run | tokens/s (median) | all repetitions | vs offline |",
        "| --- | ---: | --- | ---: |",
        f"| offline (scored corpus) | {off:.0f} | {', '.join(f'{r:.0f}' for r in rates['offline'])} | 1 |",
        f"| online reference | {on:.0f} | {', '.join(f'{r:.0f}' for r in rates['online'])} | {on / off:.2f} |",
        "",
        f"Scoring the same {tokens} tokens beforehand (`score_rows`, batch {batch}): {score_s:.2f} s "
        f"({tokens / score_s:.0f} tokens/s), paid once per corpus; the online reference pays it in every epoch.",
        f"Model (not a measurement): a step plus one scoring forward at the two medians measured here, "
        f"1 / (1/{off:.0f} + 1/{tokens / score_s:.0f}) = {expected:.0f} tokens/s ({expected / off:.2f} of offline).",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"online-ref-{machine}-{date}{'-quick' if args.quick else ''}.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
