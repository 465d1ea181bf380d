# Quickstart:  make demo   (set-up + the built-in R1 recipe)     make test   (set-up + the test suite)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup

setup: $(STAMP)

# An existing torch (e.g. your CUDA build) is kept; otherwise the CPU build torch==2.13.0 is installed,
# never an unpinned torch (which would pull several GB of CUDA wheels).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/r1-lightning recipe configs/recipes/r1_tiny.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q
