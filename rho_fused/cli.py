"""The ``rho-fused`` command: ``score``, ``train``, ``report`` and ``demo`` (also ``python -m rho_fused``).

``score`` and ``train`` also run under ``torchrun --nproc-per-node N`` (data parallel): the
process group is initialised from torchrun's environment (``gloo`` on CPU, ``nccl`` on CUDA, one
GPU per process by ``LOCAL_RANK``); rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .ranks import launched_rank_label, local_device, print_on_rank_zero, process_group_from_env

DTYPES = ("float32", "bfloat16", "float16")


def _tokenizer(path: str | None, *fallbacks: str | None) -> Any:
    from transformers import AutoTokenizer

    for candidate in (path, *fallbacks):
        if candidate:
            return AutoTokenizer.from_pretrained(candidate)
    raise SystemExit("error: no tokenizer: pass --tokenizer")


def cmd_score(args: argparse.Namespace) -> int:
    """Score a corpus with a reference model into a dataset with ``input_ids`` and ``ref_loss``."""
    import torch
    from transformers import AutoModelForCausalLM

    from .scoring import score_corpus

    tokenizer = _tokenizer(args.tokenizer, args.ref_model)
    model = AutoModelForCausalLM.from_pretrained(args.ref_model, dtype=getattr(torch, args.dtype))
    model.to(local_device(args.device))
    timing: dict[str, float] = {}
    meta = score_corpus(
        model,
        tokenizer,
        args.corpus,  # streamed: never loaded whole
        args.out,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        backend=args.backend,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        resume=args.resume,
        shard_tokens=args.shard_tokens,
        docs_per_block=args.docs_per_block,
        num_proc=args.num_proc,
        text_column=args.text_column,
        timing=timing,
    )
    print_on_rank_zero(
        f"scored {meta['n_sequences']} sequences ({meta['n_tokens']} tokens, {len(meta['shards'])} shards) -> "
        f"{args.out}; mean ref_loss {meta['mean_ref_loss']:.4f}; tokenizer {meta['tokenizer_fingerprint']}, "
        f"reference {meta['reference_fingerprint']}; throughput {timing['all_ranks_tokens_per_s']:.0f} tokens/s "
        f"({timing['all_ranks_tokens']} tokens in {timing['all_ranks_seconds']:.1f} s)",
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a causal LM with SLM (or plain causal LM with ``--keep-ratio 1``) on a scored dataset."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .atomic import write_json
    from .scoring import load_scored
    from .train_loop import TrainConfig, save_model, train

    tokenizer = _tokenizer(args.tokenizer, args.model, args.config)
    if args.ref_model:  # online reference: a corpus in, scored batch by batch during training
        from .online_ref import corpus_rows_for_training

        data = corpus_rows_for_training(args.data, tokenizer, args.seq_len, args.text_column)
        meta = {"online_reference": str(args.ref_model)}
        eval_data = None
        if args.eval_data:
            eval_data = corpus_rows_for_training(args.eval_data, tokenizer, args.seq_len, args.text_column)
    else:
        data, meta = load_scored(args.data, tokenizer)  # refuses a corpus scored with another tokenizer
        eval_data = load_scored(args.eval_data, tokenizer)[0] if args.eval_data else None
    torch.manual_seed(args.seed)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config))
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise SystemExit(f"error: the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {vocab}")
    model.to(local_device(args.device))
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    out = Path(args.out)
    ref_model, on_log, trajectory = _train_extras(args, cfg, tokenizer, eval_data, out)
    history = train(
        model,
        data,
        cfg,
        out_dir=out,
        eval_data=eval_data,
        resume=args.resume,
        stop_at=args.stop_at,
        progress=not args.no_progress,
        ref_model=ref_model,
        on_log=on_log,
        trajectory=trajectory,
    )
    if on_log is not None:
        on_log.close()
    if cfg.fsdp:  # gather the shards (every rank takes part): rank 0 then holds the whole model
        from .fsdp import plain_copy

        model = plain_copy(model)
    if args.rank != 0:
        return 0  # every rank holds the same weights and history: rank 0 writes them
    write_json(out / "history.json", history)
    if args.stop_at is not None and args.stop_at < cfg.steps:
        print(f"stopped at step {args.stop_at}; continue with --resume")
        return 0
    info = {"config": dataclasses.asdict(cfg), "data": str(args.data), "scored": meta}
    save_model(model, tokenizer, out / "model", extra=info)
    last = history[-1] if history else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    print(f"trained {cfg.steps} steps -> {out / 'model'}; last log: {summary}")
    return 0


def _train_extras(args: argparse.Namespace, cfg: Any, tokenizer: Any, eval_data: Any, out: Path) -> tuple[Any, ...]:
    """``train``'s online reference (--ref-model), TensorBoard log (--report-to) and token trajectory."""
    from .online_ref import load_reference
    from .selection_log import TRAJECTORY_FILE, TensorBoardLog, TokenTrajectory

    ref_model = load_reference(args.ref_model, tokenizer, local_device(args.device)) if args.ref_model else None
    on_log = TensorBoardLog(out / "tensorboard") if args.report_to == "tensorboard" and args.rank == 0 else None
    trajectory = None
    if args.trajectory_every:
        if eval_data is None:
            raise ValueError("--trajectory-every needs --eval-data: its first --trajectory-rows rows are the sample")
        rows = [eval_data[i] for i in range(min(args.trajectory_rows, len(eval_data)))]
        trajectory = TokenTrajectory(
            rows, out / TRAJECTORY_FILE, keep_ratio=cfg.keep_ratio, every=args.trajectory_every, ref_model=ref_model
        )
    return ref_model, on_log, trajectory


def cmd_report(args: argparse.Namespace) -> int:
    """Draw a run's curves (PNG) and token view (HTML)."""
    from .report import write_report

    tokenizer = _tokenizer(args.tokenizer) if args.tokenizer else None
    written = write_report(args.run, args.out, tokenizer)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on CPU on the champ-dataset corpus (see `rho_fused.demo`)."""
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, threads=args.threads, progress=not args.no_progress)
    return 0


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows the defaults, except where there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .scoring import DEFAULT_DOCS_PER_BLOCK, DEFAULT_SHARD_TOKENS
    from .train_loop import TRAIN_SCOPES, TrainConfig

    parser = argparse.ArgumentParser(
        prog="rho-fused", description="Rho-1 selective language modelling: score a corpus, train, run the demo."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    backends = ("auto", *BACKENDS)
    defaults = _ShowDefaults

    p = sub.add_parser(
        "score", formatter_class=defaults, help="score a corpus with a reference model (per-token ref_loss)"
    )
    p.add_argument("--ref-model", required=True, help="reference model: a saved Hugging Face model directory or name")
    p.add_argument("--corpus", required=True, help="save_to_disk directory, or .jsonl/.json/.parquet/.csv/.txt file")
    p.add_argument("--out", required=True, help="output directory of the scored dataset")
    p.add_argument("--tokenizer", help="tokenizer directory or name (default: the reference model's)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--text-column", default="text", help="text column when the corpus has no input_ids")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the reference model")
    p.add_argument("--backend", choices=backends, default="auto", help="loss backend")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run (OUT.partial) after its last shard"
    )
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="most tokens per shard file (Arrow)")
    p.add_argument(
        "--docs-per-block",
        type=int,
        default=DEFAULT_DOCS_PER_BLOCK,
        help="documents packed together; blocks are dealt to the ranks",
    )
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer worker processes (1: tokenize in this process)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_score)

    d = TrainConfig()
    p = sub.add_parser(
        "train", formatter_class=defaults, help="train a causal LM with SLM (or plain CLM with --keep-ratio 1)"
    )
    p.add_argument("--data", required=True, help="scored dataset from `rho-fused score` (with --ref-model: a corpus)")
    p.add_argument("--out", required=True, help="output directory: checkpoint/, model/, history.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="start from this pretrained model (directory or name)")
    src.add_argument("--config", help="start from a fresh model of this config (directory or name)")
    p.add_argument("--tokenizer", help="tokenizer (default: the --model / --config one); must match the data's")
    p.add_argument("--eval-data", help="scored dataset to evaluate on (mean loss of every token)")
    p.add_argument("--keep-ratio", type=float, default=0.6, help="fraction of tokens kept (1: plain CLM)")
    p.add_argument(
        "--scope",
        choices=TRAIN_SCOPES,
        default=d.scope,
        help="select per sequence, or over the whole global batch (under torchrun: all ranks' shards together)",
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="rows per micro-batch (the global batch under torchrun)"
    )
    p.add_argument("--accum-steps", type=int, default=d.accum_steps, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--beta1", type=float, default=d.beta1)
    p.add_argument("--beta2", type=float, default=d.beta2)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the initialisation and the data order")
    p.add_argument("--backend", choices=backends, default=d.backend, help="loss backend")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2), bf16 on GPU",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--stop-at", type=int, help="stop after this step (with a checkpoint), as if interrupted")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--ref-model", help="online reference: score each batch with this model; --data is then a corpus as for score"
    )
    p.add_argument("--seq-len", type=int, default=1024, help="with --ref-model: tokens per row of the corpus")
    p.add_argument("--text-column", default="text", help="with --ref-model: the corpus's text column")
    p.add_argument("--report-to", choices=("none", "tensorboard"), default="none", help="also log to OUT/tensorboard")
    p.add_argument(
        "--trajectory-every", type=int, default=0, help="record the held-out sample's per-token excess every N steps"
    )
    p.add_argument("--trajectory-rows", type=int, default=4, help="rows of --eval-data in the held-out sample")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", formatter_class=defaults, help="draw a run's curves (PNG) and token view (HTML)")
    p.add_argument("run", help="output directory of `rho-fused train`, or of a SelectiveTrainer")
    p.add_argument("--out", help="where to write curves.png and tokens.html (default: RUN/report)")
    p.add_argument("--tokenizer", help="decodes the token view (default: RUN/model's tokenizer)")
    p.add_argument("--no-progress", action="store_true", help="(no progress bars are shown anyway)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo", formatter_class=defaults, help="the whole pipeline on CPU on the champ-dataset math corpus"
    )
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a smoke-test run under a minute")
    p.add_argument("--seed", type=int, default=0, help="seeds the models' initialisation and the data order")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on shared small CPUs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _silence_library_bars() -> None:
    """No progress bars from datasets and transformers in this process."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rho-fused`` console script and of ``python -m rho_fused``."""
    args = build_parser().parse_args(argv)
    from .scoring import FingerprintMismatchError

    if args.no_progress:  # the libraries' own bars too (saving shards, writing datasets)
        _silence_library_bars()

    try:
        if args.command in ("demo", "report"):
            return int(args.func(args) or 0)
        with process_group_from_env(args.device) as args.rank:
            if args.rank != 0:  # one set of progress bars: rank 0's
                _silence_library_bars()
            return int(args.func(args) or 0)
    except (FingerprintMismatchError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"rho-fused {args.command}{launched_rank_label()}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
