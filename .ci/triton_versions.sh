#!/usr/bin/env bash
# CI, second job: the Triton kernels on other Tritons than the main venv's.
#   bash .ci/triton_versions.sh 3.6.0 [3.2.0 ...]
# For each version: a venv of its own, outside the clone, with torch 2.13.0 (the only torch CI can
# install; its CPU wheel requires no triton), that triton, numpy < 2.4 (the interpreter of
# Triton <= 3.6 breaks on 2.4), pytest, and the package without the rest of its dependencies, which
# the kernel tests do not import (installing them took most of the job's time); torch's and
# triton's versions are checked against setup.py's range instead. Then the interpreter kernel
# tests, tests/test_triton_*.py (the offline compile report and its checks among them) and the
# triton cases of tests/test_variants.py (hypothesis installed for them), and the
# report itself, for the log. The versions run side by side (the interpreter keeps one core busy),
# each into a log of its own, printed when all are done.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

one() {
    local version=$1 start=$SECONDS venv="$root/triton-$1"
    python3 -m venv "$venv"
    local py="$venv/bin/python"
    "$py" -m pip install -q "torch==2.13.0" "triton==$version" "numpy<2.4" pytest hypothesis
    "$py" -m pip install -q --no-deps -e .
    "$py" -c '
from importlib.metadata import requires, version
from packaging.requirements import Requirement
for req in map(Requirement, requires("rho-fused")):
    if req.name in ("torch", "triton"):
        assert version(req.name) in req.specifier, f"{req.name} {version(req.name)} is outside setup.py: {req}"
print("==", *(f"{name} {version(name)}" for name in ("triton", "torch", "numpy")))
'
    local installed=$SECONDS
    "$py" -m pytest -q -p no:cacheprovider tests/test_triton_*.py tests/test_variants.py -k triton
    "$py" -m rho_fused.kernels.report
    echo "== triton $version: $((SECONDS - start)) s, of which $((installed - start)) s installing"
}

versions=("$@")
pids=()
for version in "${versions[@]}"; do
    one "$version" >"$root/$version.log" 2>&1 &
    pids+=($!)
done
failed=()
for i in "${!versions[@]}"; do
    wait "${pids[$i]}" || failed+=("${versions[$i]}")
    cat "$root/${versions[$i]}.log"
done
if ((${#failed[@]})); then
    echo "== FAILED on triton ${failed[*]}"
    exit 1
fi
