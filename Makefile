PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench

# Torch first, and only if absent: `pip install torch==2.13.0` takes the local CPU wheel where one
# lies on disk; any torch 2.11-2.13 already installed (e.g. a CUDA build) is kept.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) examples/demo_digits.py

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/bench_mlp.py
