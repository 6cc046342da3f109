"""``rho-fused demo --quick`` end to end, as a user runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_demo_quick_end_to_end(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "rho_fused", "demo", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    m = json.loads((out / "metrics.json").read_text())
    assert set(m["results"]) == {"CLM", "SLM 0.6"}
    clm, slm = m["results"]["CLM"], m["results"]["SLM 0.6"]
    assert clm["kept_fraction"] == 1.0
    assert 0.6 <= slm["kept_fraction"] < 0.62  # ceil(0.6 * n) of n tokens per sequence
    for r in (clm, slm, m["reference"]):
        assert math.isfinite(r["held_out_human_loss"]) and 0 < r["held_out_human_loss"] < math.log(512) + 1
    assert m["data"]["noisy_train_tokens"] == m["config"]["steps"] * m["config"]["batch_size"] * m["config"]["seq_len"]
    assert m["winner_on_held_out_human"] in m["results"]
    assert m["wall_seconds"] > 0  # recorded; how long it takes is measured, not asserted (load varies)

    # the table is printed
    assert "| CLM |" in proc.stdout and "| SLM 0.6 |" in proc.stdout
    # the artefacts
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "tokens.html").read_text()
    assert "kept" in page and "dropped" in page and page.count("<span") > 100
    assert (out / "scored" / "rho_fused.json").is_file()
    assert (out / "reference" / "config.json").is_file()
    # no temporary directories left behind
    assert not [p for p in out.rglob(".*tmp*")]
