"""``rho-fused report RUN``: a training run's curves (PNG) and its token view (HTML).

A run is the output directory of ``rho-fused train`` (``history.json``, ``trajectory.json``,
``model/`` with the tokenizer) or of a `SelectiveTrainer` / `SelectiveSFTTrainer`
(``trainer_state.json`` of its last checkpoint, ``slm/...`` log entries). The curves: the losses,
the kept fraction, the selection threshold with the mean excess of kept and dropped tokens, and
the mean reference loss, against the step. The token view: the held-out sample of
``trajectory.json``, each token coloured by its excess loss at the chosen record, kept tokens
underlined, with every record's excess of that token in its tooltip (the per-token loss trajectory).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text
from .selection_log import TRAJECTORY_FILE, TRAJECTORY_FORMAT

CURVES_FILE = "curves.png"
TOKENS_FILE = "tokens.html"

# Log keys of the two trainers, read under one name: the loop's "kept", the Trainer's "slm/..." entries
_ALIASES = {"kept": "kept_fraction"}


def load_history(run: str | os.PathLike) -> list[dict[str, float]]:
    """A run's log entries, each with a ``step``: ``history.json``, or the newest ``trainer_state.json``."""
    run = Path(run)
    if (run / "history.json").is_file():
        entries = json.loads((run / "history.json").read_text(encoding="utf-8"))
    else:
        states = sorted(
            run.glob("**/trainer_state.json"), key=lambda p: json.loads(p.read_text(encoding="utf-8"))["global_step"]
        )
        if not states:
            raise FileNotFoundError(f"{run} has no history.json (rho-fused train) and no trainer_state.json (Trainer)")
        entries = json.loads(states[-1].read_text(encoding="utf-8"))["log_history"]
    out = []
    for e in entries:
        flat = {_ALIASES.get(k, k.removeprefix("slm/")): v for k, v in e.items() if isinstance(v, (int, float))}
        if "step" in flat:
            out.append(flat)
    return out


def plot_curves(history: Sequence[dict[str, float]], path: str | os.PathLike, title: str = "") -> None:
    """Four panels against the step: losses; kept fraction (and per source); threshold and mean excess; ref_loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_source = sorted({k for e in history for k in e if k.startswith("kept_fraction/")})
    panels = [
        ("loss (nats)", ["loss", "loss_all", "eval_loss"]),
        ("kept fraction", ["kept_fraction", *per_source]),
        ("excess loss (nats)", ["threshold", "excess_kept", "excess_dropped"]),
        ("reference loss (nats)", ["ref_loss"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (label, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            points = [(e["step"], e[key]) for e in history if key in e]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=key)
        ax.set(xlabel="step", ylabel=label)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(title)
    fig.tight_layout()
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(final)


def token_page(trajectory: dict[str, Any], decode: Callable[[int], str] | None = None, title: str = "") -> str:
    """The token view of a trajectory (`rho_fused.selection_log.TokenTrajectory`) as one HTML page.

    The data sits in the page as JSON; a short script draws the tokens of the chosen record (the
    last at first): background green for positive excess, red for negative, stronger for larger
    |excess|; kept tokens underlined, dropped ones grey; position 0 (never predicted) grey.
    """
    if trajectory.get("format") != TRAJECTORY_FORMAT:
        raise ValueError(f"not a token trajectory: format {trajectory.get('format')!r}, expected {TRAJECTORY_FORMAT!r}")
    if not trajectory["records"]:
        raise ValueError("the trajectory has no record yet")
    decode = decode or (lambda i: f"[{i}]")
    data = {
        "keep_ratio": trajectory["keep_ratio"],
        "tokens": [[decode(int(i)) for i in row] for row in trajectory["input_ids"]],
        "records": trajectory["records"],
    }
    payload = json.dumps(data).replace("</", "<\\/")  # no "</script>" inside the script
    return f"""<!doctype html>
<meta charset="utf-8">
<title>{html.escape(title or "rho-fused token view")}</title>
<style>
body{{font:14px/1.8 monospace;max-width:60em;margin:2em auto}}
p.row{{white-space:pre-wrap;border-bottom:1px solid #ccc;padding-bottom:1em}}
.k{{border-bottom:2px solid #222}} .d{{color:#999}}
</style>
<h1>{html.escape(title or "rho-fused token view")}</h1>
<p>Held-out tokens coloured by their excess loss (the model's loss minus the reference's) at the
chosen step: <span style="background:rgba(40,160,40,.6)">green: positive</span>,
<span style="background:rgba(220,60,60,.6)">red: negative</span>. <span class="k">Underlined</span>:
kept by the selection (the top share of each sequence by excess), <span class="d">grey</span>: dropped.
Hover a token for its excess at every recorded step.</p>
<p>step <select id="step"></select> <span id="summary"></span></p>
<div id="rows"></div>
<script id="data" type="application/json">{payload}</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const select = document.getElementById("step");
data.records.forEach((r, i) => select.add(new Option(r.step, i)));
select.value = data.records.length - 1;
function draw(i) {{
  const rec = data.records[i], rows = document.getElementById("rows");
  let kept = 0, scored = 0, scale = 0;
  rec.excess.forEach(row => row.slice(1).forEach(x => scale = Math.max(scale, Math.abs(x))));
  rows.replaceChildren();
  data.tokens.forEach((tokens, b) => {{
    const p = document.createElement("p");
    p.className = "row";
    tokens.forEach((text, t) => {{
      const span = document.createElement("span");
      span.textContent = text;
      if (t === 0) {{
        span.className = "tok d";
        span.title = "first token: not predicted";
      }} else {{
        const x = rec.excess[b][t], k = rec.kept[b][t] === 1, a = scale ? 0.7 * Math.abs(x) / scale : 0;
        span.className = "tok " + (k ? "k" : "d");
        span.dataset.excess = x;
        span.style.background = x > 0 ? `rgba(40,160,40,${{a.toFixed(2)}})` : `rgba(220,60,60,${{a.toFixed(2)}})`;
        const path = data.records.map(r => `${{r.step}}: ${{r.excess[b][t].toFixed(3)}}`).join(", ");
        span.title = `loss ${{rec.ce[b][t].toFixed(3)}}, ref ${{rec.ref_loss[b][t].toFixed(3)}}, ` +
          `excess ${{x.toFixed(3)}}, ${{k ? "kept" : "dropped"}}; excess by step: ${{path}}`;
        kept += k; scored += 1;
      }}
      p.appendChild(span);
    }});
    rows.appendChild(p);
  }});
  document.getElementById("summary").textContent = `step ${{rec.step}}: ${{kept}} of ${{scored}} tokens kept`;
}}
select.onchange = () => draw(Number(select.value));
draw(data.records.length - 1);
</script>
"""


def write_report(
    run: str | os.PathLike, out: str | os.PathLike | None = None, tokenizer: Any | None = None
) -> dict[str, Path]:
    """Write ``curves.png`` (and ``tokens.html`` when the run has a trajectory) to ``out`` (default: ``RUN/report``).

    ``tokenizer`` decodes the tokens of the view; by default the one saved in ``RUN/model``, if
    any (otherwise tokens show as ``[id]``). Returns the paths written.
    """
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    out = Path(out) if out is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    history = load_history(run)
    if not history:
        raise ValueError(f"{run}: the run's log has no entry with a step")
    written = {"curves": out / CURVES_FILE}
    plot_curves(history, written["curves"], title=f"rho-fused run {run.name}")
    traj_path = run / TRAJECTORY_FILE
    if traj_path.is_file():
        trajectory = json.loads(traj_path.read_text(encoding="utf-8"))
        if tokenizer is None and (run / "model" / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(run / "model")
        decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else None
        written["tokens"] = out / TOKENS_FILE
        write_text(written["tokens"], token_page(trajectory, decode, title=f"rho-fused run {run.name}: tokens"))
    return written
