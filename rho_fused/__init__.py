"""rho-fused: the Rho-1 Selective Language Modeling loss, fused with the LM head.

The loss contract is the docstring of `fused_selective_loss`. The modules, from the loss down to
the kernels, then the training pipeline built on the public API:

    loss           the public loss functions; `fused_selective_loss` holds the contract
    validation     the checks of every entry point's arguments, into a `LossProblem`; SCOPES, REDUCTIONS
    problem        `LossProblem` (one validated call), `SelectionStats`, reduction and keep-count arithmetic
    selection      step 5 for the fused backends: top-k by excess, threshold, sampling, soft weights (`choose`)
    global_select  exact top-k over every rank of a process group (scope="global"), by radix histograms
    backends/      `resolve` a backend by name (BACKENDS); each computes the contract:
      reference    the oracle: the contract transcribed, full fp32 logits, autograd
      chunked      pure PyTorch in tiles, never the full logits; backward on kept rows only
      triton       the fused Triton kernels, five launches, no host synchronisation
      ops          the fused backends as torch custom operators (opaque to torch.compile)
    kernels        the Triton kernels, one per file with its launcher (kernels/ in the tree, installed here)
    hf             a Hugging Face causal LM's loss without its logits (`causal_lm_loss`, `kept_count`)
    hf_trainer     `SelectiveTrainer`: `transformers.Trainer` with the fused selective loss
    trl            `SelectiveSFTTrainer`: `trl.SFTTrainer` with it (PEFT adapters, a self-reference)
    online_ref     the reference scoring each training batch as it arrives (`reference_losses`)
    selection_log  selection statistics for the logs (`SelectionLog`), `TokenTrajectory`, TensorBoard
    report         `rho-fused report`: a run's curves (PNG) and token view (HTML)
    train_loop     the minimal training loop behind `rho-fused train` (`train`, `TrainConfig`, `evaluate`)
    ranks          data-parallel runs: rank and world, torchrun's process group, shards, the DDP scaling rule
    fsdp           FSDP2: `shard` (fully_shard per decoder layer and root), the loss in the root's forward, DCP
    scoring        a corpus scored by a reference model: the per-token `ref_loss` dataset and its fingerprints
    stream         a corpus streamed a block of documents at a time: read, tokenized (worker processes), packed
    shards         the scored corpus on disk: Arrow shards, resume state, manifest; read memory-mapped
    data           corpora in and batches out: reading, tokenizing, packing, padding
    atomic         atomic writes: an output appears complete under its name, or not at all
    outputs        output directories: the marker --overwrite needs, the lock, `claim_output` for a command
    data_checks    rows checked before the first step (ids, ref_loss lengths, finite values), the data fingerprint
    ranges         allowed ranges of numeric settings (`TrainConfig.check` and the CLI's option parsers)
    stop_signals   SIGINT/SIGTERM as a request to stop at the next step boundary
    errors         error classes and `explain`: the one line and exit status of a failed command
    champ          the demo's corpus, from the champ-dataset package
    demo           `rho-fused demo`: the whole pipeline on CPU, CLM against SLM
    cli            the `rho-fused` command: score, train, report, demo (also `python -m rho_fused`)
"""

from .hf import causal_lm_loss
from .loss import SelectiveLMLoss, fused_selective_loss, linear_cross_entropy, token_losses
from .problem import SelectionStats

__version__ = "0.1.0"

__all__ = [
    "SelectionStats",
    "SelectiveLMLoss",
    "causal_lm_loss",
    "fused_selective_loss",
    "linear_cross_entropy",
    "token_losses",
]
