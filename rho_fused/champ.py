"""The demo's corpus, from the `champ-dataset` package (MIT; read locally, nothing is downloaded).

CHAMP holds 270 competition math problems with human-written step-by-step solutions, concepts
and hints, and, for every problem, dozens of conversations in which language models (GPT-3.5,
GPT-4, GPT-4 Turbo, PaLM 2) solve it, often wrongly. The demo splits the problems once (a fixed
seed, whatever the training seed): the held-out problems' human-written solutions are the
evaluation set, the other problems' human-written text trains the reference model, and the
model-written replies about those other problems are the noisy corpus to train on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

SPLIT_SEED = 1234


@dataclass
class ChampSplits:
    """Documents (strings) of each role in the demo."""

    human_train: list[str]  # problems with their human-written solutions, concepts and hints
    human_eval: list[str]  # held-out problems' human-written solutions
    model_train: list[str]  # model-written replies about the training problems
    model_eval: list[str]  # model-written replies about the held-out problems
    n_problems: int
    n_eval_problems: int


def _solution(problem: dict) -> str:
    return " ".join(step["_text"] for step in problem["solution"]["steps"])


def load_champ(eval_fraction: float = 0.2) -> ChampSplits:
    """Read CHAMP's ``v0.json`` and split it by problem (``eval_fraction`` of them held out)."""
    try:
        files = resources.files("champ_dataset") / "dataset_files" / "v0.json"
    except ModuleNotFoundError as e:
        raise SystemExit("the demo needs the champ-dataset package: pip install 'rho-fused[demo]'") from e
    data = json.loads(files.read_text(encoding="utf-8"))
    ids = sorted(data["problems"])
    random.Random(SPLIT_SEED).shuffle(ids)
    n_eval = max(1, round(eval_fraction * len(ids)))
    eval_ids = set(ids[:n_eval])

    human_train, model_train, model_eval, human_eval = [], [], [], []
    eval_hints: set[str] = set()
    for pid in sorted(data["problems"]):
        p = data["problems"][pid]
        replies = [
            m["text"]
            for conv in p["conversations"].values()
            for m in conv["messages"]
            if m["role"].startswith("Model.") and m.get("text")
        ]
        if pid in eval_ids:
            human_eval.append(_solution(p))
            model_eval.extend(replies)
            eval_hints.update(c for c in p["ch_list"] if c.startswith("H_"))
        else:
            human_train.append(f"Problem: {p['_text']}\nSolution: {_solution(p)}\nAnswer: {p['_answer']}")
            model_train.extend(replies)
    # Concepts are general facts; hints are specific to a problem, so the held-out problems' hints stay out.
    human_train += [c["_text"] for c in data["concepts"].values() if c.get("_text")]
    human_train += [h["_text"] for k, h in data["hints"].items() if h.get("_text") and k not in eval_hints]
    return ChampSplits(human_train, human_eval, model_train, model_eval, len(ids), n_eval)
