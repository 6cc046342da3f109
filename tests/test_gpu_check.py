"""``bench/gpu_check.py`` end to end in its smoke mode: the one command a GPU window runs works before one is lent.

The smoke run (tiny shapes, CPU, Triton's interpreter) takes about 80 s on two cores. It must record
every section's checks, none of them fail or error, and write the markdown summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"

# section number -> the name prefixes of its checks
SECTIONS = {
    1: ("env/",),
    2: ("compact/", "select/"),
    3: ("parity/", "loss/"),
    4: ("nosync/", "graph/", "determinism/"),
    5: ("timing/",),
    6: ("offsets/",),
    7: ("compile/", "autocast/"),
    8: ("sweep/",),
    9: ("score/",),
    10: ("variant/",),
}


def run_smoke(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """The script with ``--smoke --out out`` and ``args``; its process and its JSONL records."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env, check=False)
    path = out / "gpu_check.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return proc, records


def test_smoke_run_records_every_section_without_failure(tmp_path):
    proc, records = run_smoke(tmp_path / "out")
    tail = (proc.stdout + proc.stderr)[-3000:]
    bad = [(r["name"], r["status"], r.get("reason")) for r in records if r["status"] in ("fail", "error")]
    assert not bad, f"failed checks: {bad}\n{tail}"
    assert proc.returncode == 0, tail
    names = [r["name"] for r in records]
    assert len(names) == len(set(names)), "a check is recorded twice"
    for section, prefixes in SECTIONS.items():
        mine = [r for r in records if r["section"] == section]
        assert mine, f"section {section} recorded no check\n{tail}"
        assert all(r["name"].startswith(prefixes) for r in mine), [r["name"] for r in mine]
        assert all(set(r) >= {"name", "status", "figures", "seconds"} for r in mine)
        if section != 6:  # offsets past 2^31 cannot be allocated on CPU: skipped, but their code runs
            assert any(r["status"] in ("pass", "warn") for r in mine), f"section {section} ran nothing"
    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(name in summary for name in names)


def test_no_budget_skips_every_check(tmp_path):
    proc, records = run_smoke(tmp_path / "out", "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert records and all(r["status"] == "skip" and r["reason"].startswith("budget") for r in records)
    assert {r["section"] for r in records} == set(SECTIONS)
    assert (tmp_path / "out" / "gpu_check.md").exists()


def test_imports_the_package_from_an_uninstalled_checkout(tmp_path):
    """On a GPU machine that received a copy of the tree, ``rho_fused.kernels`` is mapped to ``kernels/``."""
    code = f"""
import importlib.metadata as md, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
real = md.distribution
def distribution(name):
    if name == "rho-fused":
        raise md.PackageNotFoundError(name)
    return real(name)
md.distribution = distribution
sys.path.insert(0, {str(SCRIPT.parent)!r})
import gpu_check
gpu_check.ensure_package()
import rho_fused
from rho_fused.backends import triton
from rho_fused.kernels import compact
assert triton is not None and compact.__file__.startswith({str(ROOT / "kernels")!r}), compact.__file__
print(rho_fused.__file__)
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith(str(ROOT / "rho_fused"))


def test_restarts_after_a_lost_cuda_context(tmp_path):
    """A check that leaves CUDA unusable makes the script replace its process and continue where it was."""
    proc, records = run_smoke(tmp_path / "out", "--only", "^(env|compact)/", "--lose-context-after", "env/device")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "restarting for the remaining checks" in proc.stdout
    names = [r["name"] for r in records]
    assert len(names) == len(set(names)), names
    status = {r["name"]: r["status"] for r in records}
    assert status["env/versions"] == status["env/device"] == status["compact/masks"] == "pass"
    assert "Restarted 1 time" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_tiles_set_the_launch_configurations_of_the_run(tmp_path):
    """``--tiles`` makes a candidate the default for the whole run; a malformed label is a usage error."""
    proc, records = run_smoke(
        tmp_path / "ok", "--only", "parity/plain/batch/mean/bf16", "--tiles", "n32v64d16w4s1,n32v64d16g1w4s1"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [r["status"] for r in records if r["name"] == "parity/plain/batch/mean/bf16"] == ["pass"]
    assert "--tiles n32v64d16w4s1,n32v64d16g1w4s1" in (tmp_path / "ok" / "gpu_check.md").read_text()
    proc, _ = run_smoke(tmp_path / "bad", "--tiles", "n32v64")
    assert proc.returncode == 2 and "--tiles: expected FORWARD,BACKWARD labels, got 'n32v64'" in proc.stderr
