"""Scoring throughput: rho_fused's scorer against the plain Hugging Face path, same model, same batches.

    python bench/score_throughput.py                      # CPU preset: a small Llama, fp32
    python bench/score_throughput.py --preset gpu         # H200 preset: a 1B-class Llama, bf16 (~30 s)
    python bench/score_throughput.py --layers 4 --dim 256 --vocab 32000 --batch 8 --seq-len 512 --dtype float32

Two ways to get the per-token reference loss of a batch of ``batch x seq_len`` tokens:

- ``hf``: ``model(input_ids, attention_mask=...).logits`` then
  ``F.cross_entropy(logits.float(), targets, reduction="none")`` (the full ``[tokens, vocab]`` logits);
- ``rho_fused``: `rho_fused.scoring.score_batch` (the model's body, then `token_losses` on the final
  hidden states: no logits).

They alternate over ``--reps`` timed batches after a warm-up; the figure is tokens per second (median
batch time). Each is then run once more alone for its peak memory (CUDA: ``max_memory_allocated``
above the model; CPU: growth of the resident set over a fresh process's, in a subprocess). The two
losses are compared (max absolute difference). ``--pipeline`` also times `score_corpus` end to end
on random rows in memory: batching, scoring and writing the Arrow shards (skipped, and said so in
the results, where pyarrow is not installed).

Writes ``bench/results/score-throughput-<device>.json`` (or ``--out``) and prints a markdown table.
The model is randomly initialised (no download); tokens are uniform random ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PRESETS = {
    # ~1.6 s a batch pair on 2 shared CPU cores
    "cpu": dict(layers=4, dim=256, heads=4, vocab=32000, batch=8, seq_len=512, dtype="float32", reps=5),
    # a Llama-3.2-1B-like shape (16 layers, 2048 wide, 128256 vocabulary), 16k tokens a batch
    "gpu": dict(layers=16, dim=2048, heads=32, vocab=128256, batch=8, seq_len=2048, dtype="bfloat16", reps=10),
}


def make_model(args: argparse.Namespace, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=4 * args.dim, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 4),
        max_position_embeddings=args.seq_len, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    return model.eval()


def batches(args: argparse.Namespace, n: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [list(rng.integers(0, args.vocab, (args.batch, args.seq_len), dtype=np.int32)) for _ in range(n)]


@torch.no_grad()
def hf_losses(model: torch.nn.Module, rows: list[np.ndarray], device: str) -> torch.Tensor:
    ids = torch.from_numpy(np.stack(rows)).long().to(device)
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask).logits
    targets = ids[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1)


@torch.no_grad()
def fused_losses(model: torch.nn.Module, rows: list[np.ndarray], device: str) -> list[np.ndarray]:
    from rho_fused.scoring import score_batch

    return score_batch(model, rows)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory(args: argparse.Namespace, method: str, device: str) -> float:
    """MiB the method needs above the loaded model: CUDA allocator peak, or (CPU) peak RSS growth in a subprocess."""
    if device.startswith("cuda"):
        model = make_model(args, device)
        rows = batches(args, 1)[0]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (hf_losses if method == "hf" else fused_losses)(model, rows, device)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del model
        torch.cuda.empty_cache()
        return peak
    cmd = [sys.executable, __file__, *args.argv, "--memory-of", method]
    out = subprocess.check_output(cmd, text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def pipeline(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, float]:
    """`score_corpus` end to end on random rows: batching, scoring, writing shards, the manifest."""
    from transformers import PreTrainedTokenizerFast

    from rho_fused.scoring import score_corpus

    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer())
    rows = [r for b in batches(args, args.reps) for r in b]
    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        score_corpus(model, tok, rows, Path(tmp) / "out", seq_len=args.seq_len, batch_size=args.batch,
                     progress=False, timing=timing)  # fmt: skip
    return timing


def _byte_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison (``argv`` as on the command line), write and print the results; return them."""
    from gpu_check import ensure_package  # rho_fused from this checkout where it is not installed

    ensure_package()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default=None, help="default: gpu on CUDA, else cpu")
    for name in ("layers", "dim", "heads", "vocab", "batch", "seq_len", "reps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pipeline", action="store_true", help="also time score_corpus end to end")
    parser.add_argument("--out", help="results file (default bench/results/score-throughput-<device>.json)")
    parser.add_argument("--memory-of", choices=("hf", "rho_fused"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = PRESETS[args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = args.device

    if args.memory_of:  # child: peak RSS growth of one batch over the loaded model
        model = make_model(args, device)
        rows = batches(args, 1)[0]
        base = rss_mib()
        (hf_losses if args.memory_of == "hf" else fused_losses)(model, rows, device)
        print(json.dumps({"peak_mib": rss_mib() - base}))
        return {}

    model = make_model(args, device)
    data = batches(args, args.reps + 1)
    ours = fused_losses(model, data[0], device)
    theirs = hf_losses(model, data[0], device).float().cpu().numpy()
    max_diff = max(float(np.abs(o[1:] - t).max()) for o, t in zip(ours, theirs, strict=True))
    times: dict[str, list[float]] = {"hf": [], "rho_fused": []}
    for rows in data[1:]:
        times["hf"].append(timed(lambda rows=rows, m=model: hf_losses(m, rows, device), device))
        times["rho_fused"].append(timed(lambda rows=rows, m=model: fused_losses(m, rows, device), device))
    del model
    tokens = args.batch * args.seq_len
    result = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
        "shape": {k: getattr(args, k) for k in ("layers", "dim", "heads", "vocab", "batch", "seq_len", "dtype")},
        "command": " ".join(["python", "bench/score_throughput.py", *args.argv]),
        "max_abs_diff": max_diff,
    }
    for method, ts in times.items():
        result[method] = {
            "median_s": statistics.median(ts),
            "tokens_per_s": tokens / statistics.median(ts),
            "peak_mib": peak_memory(args, method, device),
        }
    if args.pipeline:
        try:
            import pyarrow  # noqa: F401 - the shards are Arrow files
        except ImportError:
            result["pipeline"] = {"skipped": "pyarrow is not installed"}
        else:
            result["pipeline"] = pipeline(args, make_model(args, device))
    out = Path(args.out or Path(__file__).parent / "results" / f"score-throughput-{device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    s = result["shape"]
    print(f"{s['layers']} layers, D={s['dim']}, V={s['vocab']}, batch {s['batch']} x {s['seq_len']}, {s['dtype']}, "
          f"{device} ({result['cpu'] if device == 'cpu' else result['device']}), torch {result['torch']}, "
          f"{result['threads']} threads, load {result['load_avg_1min']:.1f}")  # fmt: skip
    print("\n| method | median s / batch | tokens/s | peak MiB above the model |\n| --- | ---: | ---: | ---: |")
    for method in ("hf", "rho_fused"):
        r = result[method]
        print(f"| {method} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} |")
    if "tokens_per_s" in result.get("pipeline", {}):
        print(f"| score_corpus (with shard writing) | | {result['pipeline']['tokens_per_s']:.0f} | |")
    print(f"\nmax |ce(rho_fused) - ce(hf)| = {max_diff:.3g}; results in {out}")
    return result


def _cpu_name() -> str:
    try:
        for line in subprocess.check_output(["lscpu"], text=True).splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
