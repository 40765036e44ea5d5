# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install train test test-slow lint eval-base

$(PY):
	python3 -m venv $(VENV)

# torch is installed only when none is importable (here `torch==2.13.0` resolves to the local CPU wheel);
# the project's own `torch>=...` requirement is then already satisfied and pulls nothing more.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: install
	$(PY) launch/grpo_flux.py --config configs/tiny_shapes.yaml

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

eval-base: install
	$(PY) launch/eval_shapes.py --pipeline assets/tiny-flux-shapes --out bench/base_model_eval
