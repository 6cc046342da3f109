# The two commands: `make setup`, then `make test`. `make demo` runs the Rho-1 pipeline on CPU.
PYTHON ?= python3

.PHONY: setup test lint demo bench gpu-check

setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev,demo]"

test:
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

demo:
	$(PYTHON) -m rho_fused demo --out out/demo

bench:
	$(PYTHON) bench/run.py

# The one command of a GPU window: stops within 8 minutes (420 s budget + 45 s watchdog grace), results in
# bench/results/gpu-check-<gpu>-<versions>/.
# `make gpu-check GPU_CHECK_ARGS=--smoke` proves it on CPU first.
gpu-check:
	$(PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)
