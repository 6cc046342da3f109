# The two commands: `make setup`, then `make test`. `make demo` runs the Rho-1 pipeline on CPU.
PYTHON ?= python3

.PHONY: setup test lint demo bench

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
