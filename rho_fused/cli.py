"""The ``rho-fused`` command: ``score``, ``train``, ``report`` and ``demo`` (also ``python -m rho_fused``).

``score`` and ``train`` also run under ``torchrun --nproc-per-node N`` (data parallel): the
process group is initialised from torchrun's environment (``gloo`` on CPU, ``nccl`` on CUDA, one
GPU per process by ``LOCAL_RANK``); rank 0 alone prints and writes.

A failure ends with one line, ``rho-fused COMMAND: error: ...``, and exit status 2 (usage: an
option or the state it names) or 1 (the run failed): `rho_fused.errors.explain`. A run stopped by
SIGINT/SIGTERM says so in one line (``rho-fused train: stopped by ...``, with the command that
resumes it) and exits 128 + signal. ``--debug`` adds the traceback. Numeric options are
range-checked as they are parsed (`rho_fused.ranges`); outputs are claimed (refused, replaced, or
resumed; locked) by `rho_fused.outputs.claim_output` before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import shlex
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DataError, Stopped, UsageError, explain
from .outputs import MARKER, claim_output, make_output_dir
from .ranges import Range
from .ranks import launched_rank_label, local_device, print_on_rank_zero, process_group_from_env

DTYPES = ("float32", "bfloat16", "float16")
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # a write failed: on the output's file system


def _loaded(what: str, option: str, name: str, load: Any) -> Any:
    """``load()``, or a one-line error naming ``option`` and ``name``: usage (2) when nothing is there."""
    from .data import root_cause

    try:
        return load()
    except Exception as e:
        p = Path(name)
        if not p.exists():
            raise UsageError(
                f"{option} {name}: no such directory, and not loadable as a hub name ({root_cause(e)})"
            ) from e
        needs = ("tokenizer.json", "tokenizer_config.json") if what == "tokenizer" else ("config.json",)
        if p.is_dir() and not any((p / f).is_file() for f in needs):
            raise UsageError(f"{option} {name}: not a {what} directory (no {' or '.join(needs)})") from e
        raise DataError(f"{option} {name}: the {what} cannot be loaded ({root_cause(e)})") from e


def _tokenizer(path: str | None, *fallbacks: tuple[str, str | None]) -> Any:
    """The tokenizer of ``--tokenizer``, else of the first fallback ``(option, path)`` given."""
    from transformers import AutoTokenizer

    for option, candidate in (("--tokenizer", path), *fallbacks):
        if candidate:
            return _loaded("tokenizer", option, candidate, lambda c=candidate: AutoTokenizer.from_pretrained(c))
    raise UsageError("no tokenizer: pass --tokenizer")


def _model(option: str, name: str, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return _loaded("model", option, name, lambda: AutoModelForCausalLM.from_pretrained(name, **kwargs))


def _device(name: str | None) -> str:
    """`local_device` of ``--device``, refused unless this machine has it."""
    import torch

    if name is not None:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"--device {name}: CUDA is not available here ({why}); use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return local_device(name)


def _exists(option: str, path: str) -> None:
    if not Path(path).exists():
        raise UsageError(f"{option} {path}: no such file or directory")


def resume_command(argv: Sequence[str]) -> str:
    """The command that continues a run started with ``argv``: without --overwrite/--stop-at, with --resume."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stop-at":
            skip = True
        elif a != "--overwrite" and not a.startswith("--stop-at="):
            out.append(a)
    return shlex.join(["rho-fused", *out, *([] if "--resume" in out else ["--resume"])])


def cmd_score(args: argparse.Namespace) -> int:
    """Score a corpus with a reference model into a dataset with ``input_ids`` and ``ref_loss``."""
    import torch

    from .scoring import score_corpus

    device = _device(args.device)
    _exists("--corpus", args.corpus)
    # --resume continues OUT.partial; OUT itself is refused or replaced as for any output
    with claim_output(args.out, command="score", overwrite=args.overwrite):
        tokenizer = _tokenizer(args.tokenizer, ("--ref-model", args.ref_model))
        model = _model("--ref-model", args.ref_model, dtype=getattr(torch, args.dtype))
        model.to(device)
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
            check=not args.skip_checks,
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
    device = _device(args.device)
    _exists("--data", args.data)
    if args.eval_data:
        _exists("--eval-data", args.eval_data)
    with claim_output(args.out, command="train", overwrite=args.overwrite, resume=args.resume) as out:
        return _train_claimed(args, out, device)


def _train_claimed(args: argparse.Namespace, out: Path, device: str) -> int:
    """`cmd_train` once ``out`` is held: load, train, write."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .atomic import write_json
    from .scoring import load_scored
    from .train_loop import TrainConfig, save_model, train

    tokenizer = _tokenizer(args.tokenizer, ("--model", args.model), ("--config", args.config))
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
        model = _model("--model", args.model, dtype=torch.float32)
    else:
        config = _loaded("config", "--config", args.config, lambda: AutoConfig.from_pretrained(args.config))
        model = AutoModelForCausalLM.from_config(config)
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {vocab}")
    model.to(device)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    ref_model, on_log, trajectory = _train_extras(args, cfg, tokenizer, eval_data, out)
    if args.rank == 0:
        if args.overwrite and out.exists():  # claim_output checked that rho-fused wrote it
            shutil.rmtree(out)
        make_output_dir(out, "train")
    try:
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
            data_name=f"--data {args.data}",
            check_data=not args.skip_checks,
            handle_signals=True,
        )
    except Stopped as e:
        raise Stopped(f"{e}; continue with: {resume_command(args.argv)}", e.signum) from e
    except BaseException:
        if args.rank == 0 and [p.name for p in out.iterdir()] == [MARKER]:
            shutil.rmtree(out)  # refused before its first write: leave nothing behind
        raise
    finally:
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
            raise UsageError("--trajectory-every needs --eval-data: its first --trajectory-rows rows are the sample")
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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``rho-fused COMMAND: error: ...``, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows the defaults, except where there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .scoring import DEFAULT_DOCS_PER_BLOCK, DEFAULT_SHARD_TOKENS
    from .train_loop import CONFIG_RANGES, TRAIN_SCOPES, TrainConfig

    parser = _Parser(
        prog="rho-fused", description="Rho-1 selective language modelling: score a corpus, train, run the demo."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    backends = ("auto", *BACKENDS)
    defaults = _ShowDefaults
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the traceback of an error")
    checks = _Parser(add_help=False)
    checks.add_argument(
        "--skip-checks", action="store_true", help="skip the check of every input row before the first step"
    )

    def ranged(name: str) -> Any:  # the parser of a TrainConfig field's option
        return CONFIG_RANGES[name].parser()

    p = sub.add_parser(
        "score",
        formatter_class=defaults,
        parents=[common, checks],
        help="score a corpus with a reference model (per-token ref_loss)",
    )
    p.add_argument("--ref-model", required=True, help="reference model: a saved Hugging Face model directory or name")
    p.add_argument("--corpus", required=True, help="save_to_disk directory, or .jsonl/.json/.parquet/.csv/.txt file")
    p.add_argument("--out", required=True, help="output directory of the scored dataset")
    p.add_argument("--tokenizer", help="tokenizer directory or name (default: the reference model's)")
    p.add_argument("--seq-len", type=Range(2).parser(), default=1024, help="tokens per sequence (at least 2)")
    p.add_argument("--text-column", default="text", help="text column when the corpus has no input_ids")
    p.add_argument("--batch-size", type=Range(1).parser(), default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the reference model")
    p.add_argument("--backend", choices=backends, default="auto", help="loss backend")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of rho-fused score")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run (OUT.partial) after its last shard"
    )
    p.add_argument(
        "--shard-tokens", type=Range(1).parser(), default=DEFAULT_SHARD_TOKENS, help="most tokens per shard (Arrow)"
    )
    p.add_argument(
        "--docs-per-block",
        type=Range(1).parser(),
        default=DEFAULT_DOCS_PER_BLOCK,
        help="documents packed together; blocks are dealt to the ranks",
    )
    p.add_argument(
        "--num-proc", type=Range(0).parser(), default=1, help="tokenizer worker processes (1: tokenize in this process)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_score)

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        formatter_class=defaults,
        parents=[common, checks],
        help="train a causal LM with SLM (or plain CLM with --keep-ratio 1)",
    )
    p.add_argument("--data", required=True, help="scored dataset from `rho-fused score` (with --ref-model: a corpus)")
    p.add_argument("--out", required=True, help="output directory: checkpoint/, model/, history.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="start from this pretrained model (directory or name)")
    src.add_argument("--config", help="start from a fresh model of this config (directory or name)")
    p.add_argument("--tokenizer", help="tokenizer (default: the --model / --config one); must match the data's")
    p.add_argument("--eval-data", help="scored dataset to evaluate on (mean loss of every token)")
    p.add_argument(
        "--keep-ratio", type=ranged("keep_ratio"), default=0.6, help="fraction of tokens kept (1: plain CLM)"
    )
    p.add_argument(
        "--scope",
        choices=TRAIN_SCOPES,
        default=d.scope,
        help="select per sequence, or over the whole global batch (under torchrun: all ranks' shards together)",
    )
    p.add_argument("--steps", type=ranged("steps"), default=d.steps)
    p.add_argument(
        "--batch-size",
        type=ranged("batch_size"),
        default=d.batch_size,
        help="rows per micro-batch (the global batch under torchrun)",
    )
    p.add_argument(
        "--accum-steps", type=ranged("accum_steps"), default=d.accum_steps, help="micro-batches per optimizer step"
    )
    p.add_argument("--lr", type=ranged("lr"), default=d.lr)
    p.add_argument("--min-lr", type=ranged("min_lr"), default=d.min_lr)
    p.add_argument("--warmup-steps", type=ranged("warmup_steps"), default=d.warmup_steps)
    p.add_argument("--weight-decay", type=ranged("weight_decay"), default=d.weight_decay)
    p.add_argument("--beta1", type=ranged("beta1"), default=d.beta1)
    p.add_argument("--beta2", type=ranged("beta2"), default=d.beta2)
    p.add_argument("--grad-clip", type=ranged("grad_clip"), default=d.grad_clip)
    p.add_argument("--seed", type=ranged("seed"), default=d.seed, help="seeds the initialisation and the data order")
    p.add_argument("--backend", choices=backends, default=d.backend, help="loss backend")
    p.add_argument("--log-every", type=ranged("log_every"), default=d.log_every)
    p.add_argument("--eval-every", type=ranged("eval_every"), default=d.eval_every)
    p.add_argument(
        "--checkpoint-every", type=ranged("checkpoint_every"), default=d.checkpoint_every, help="steps (0: never)"
    )
    p.add_argument(
        "--checkpoint-seconds",
        type=ranged("checkpoint_seconds"),
        default=d.checkpoint_seconds,
        help="seconds between checkpoints (0: never)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2), bf16 on GPU",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same data and settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of rho-fused train")
    p.add_argument(
        "--stop-at", type=Range(1).parser(), help="stop after this step (with a checkpoint), as if interrupted"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--ref-model", help="online reference: score each batch with this model; --data is then a corpus as for score"
    )
    p.add_argument(
        "--seq-len", type=Range(2).parser(), default=1024, help="with --ref-model: tokens per row of the corpus"
    )
    p.add_argument("--text-column", default="text", help="with --ref-model: the corpus's text column")
    p.add_argument("--report-to", choices=("none", "tensorboard"), default="none", help="also log to OUT/tensorboard")
    p.add_argument(
        "--trajectory-every",
        type=Range(0).parser(),
        default=0,
        help="record the held-out sample's per-token excess every N steps",
    )
    p.add_argument(
        "--trajectory-rows", type=Range(1).parser(), default=4, help="rows of --eval-data in the held-out sample"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "report", formatter_class=defaults, parents=[common], help="draw a run's curves (PNG) and token view (HTML)"
    )
    p.add_argument("run", help="output directory of `rho-fused train`, or of a SelectiveTrainer")
    p.add_argument("--out", help="where to write curves.png and tokens.html (default: RUN/report)")
    p.add_argument("--tokenizer", help="decodes the token view (default: RUN/model's tokenizer)")
    p.add_argument("--no-progress", action="store_true", help="(no progress bars are shown anyway)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo",
        formatter_class=defaults,
        parents=[common],
        help="the whole pipeline on CPU on the champ-dataset math corpus",
    )
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a smoke-test run under a minute")
    p.add_argument(
        "--seed", type=Range(0).parser(), default=0, help="seeds the models' initialisation and the data order"
    )
    p.add_argument(
        "--threads", type=Range(1).parser(), default=1, help="torch threads (1 is faster on shared small CPUs)"
    )
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
    """Entry point of the ``rho-fused`` console script and of ``python -m rho_fused``.

    Returns the exit status: 0, or that of `rho_fused.errors.explain` after a one-line message.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # a usage error exits here, status 2, one line
    args.argv = argv

    try:
        if args.no_progress:  # the libraries' own bars too (saving shards, writing datasets)
            _silence_library_bars()
        if args.command in ("demo", "report"):
            return int(args.func(args) or 0)
        with process_group_from_env(args.device) as args.rank:
            if args.rank != 0:  # one set of progress bars: rank 0's
                _silence_library_bars()
            return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS and not e.filename and getattr(args, "out", None):
            e.filename = args.out  # a full disk met by a library that did not say where: the output
        code, message = explain(e)
        if args.debug:
            traceback.print_exc()
        kind = "" if isinstance(e, Stopped) else " error:"  # a requested stop is no error
        print(f"rho-fused {args.command}{launched_rank_label()}:{kind} {message}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
