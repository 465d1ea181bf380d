"""Shared fixtures: a tiny saved Hugging Face model directory and a runner for the real CLI.

No test touches the network: the hub is switched off here, before transformers or datasets are
imported, and the subprocesses the CLI tests start inherit the same environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models gain nothing from intra-op threads, and on a small shared machine two spinning
# OpenMP threads per process made a 0.1 s training step take 5 s (measured on 2 cores).
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 240

# Text a tokenizer must round-trip exactly: spaces, newlines, tabs, R1 tags, ChatML, non-ASCII.
_TOKENIZER_TEXTS = (
    "Compute 47+385.",
    "  two  spaces,\ttab\t\tand\n\nblank lines \n",
    "<think>\n7+5+0=12: write 2, carry 1\n</think>\n<answer>\n432\n</answer>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "héllo wörld — Größe, 数学, Ελληνικά, emoji 🧮\r\n",
    "'s 're don't 123456 ~!@#$%^&*()_+",
)


# The files that take longest, with their seconds in a 2-worker run of the suite (junit times, 2-vCPU AVX-512 AMD EPYC
# VM; 1,219 s in all). make test hands whole files to the xdist workers in collection order (--dist loadscope
# --no-loadscope-reorder), so these go first, longest first: a worker that drew one of them last would run alone at
# the end while the other sat idle.
LONG_FILES = {
    "test_grpo_vllm.py": 242,
    "test_distributed.py": 164,
    "test_grpo_learning.py": 86,
    "test_compiled_forward.py": 83,
    "test_resume.py": 73,
    "test_preemption.py": 68,
    "test_smollm2.py": 63,
    "test_cli.py": 54,
    "test_benchmark.py": 51,
    "test_rewards.py": 41,
    "test_process_pool.py": 38,
    "test_distillation.py": 38,
    "test_recipe.py": 37,
    "test_grpo.py": 29,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -LONG_FILES.get(item.path.name, 0))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tokenizer_texts() -> list[str]:
    return list(_TOKENIZER_TEXTS)


@pytest.fixture(scope="session")
def builtin_tokenizer():
    from r1_lightning.policy import load_tokenizer

    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_tokenizer) -> Path:
    """``builtin:tiny`` saved as a Hugging Face directory (config.json, safetensors, tokenizer)."""
    from r1_lightning.policy import load_model

    path = tmp_path_factory.mktemp("tiny_model")
    load_model("builtin:tiny", vocab_size=len(builtin_tokenizer)).save_pretrained(path)
    builtin_tokenizer.save_pretrained(path)
    return path


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "R1_DEBUG"}  # R1_DEBUG turns messages into tracebacks
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_cli(
    args: Sequence[str], cwd: Path | str, timeout: float = CLI_TIMEOUT_S, module: bool = False
) -> subprocess.CompletedProcess:
    """Run ``r1-lightning ARGS`` (or ``python -m r1_lightning ARGS``) in ``cwd``; output captured as text.

    ``cwd`` matters: configs write relative paths (``runs/...``) there, so point it at a tmp dir.
    """
    script = Path(sys.executable).with_name("r1-lightning")
    command = [sys.executable, "-m", "r1_lightning"] if module or not script.exists() else [str(script)]
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """The ``run_cli`` helper, for tests that start the real command in a subprocess."""
    return run_cli


@pytest.fixture(scope="session")
def accuracy():
    # One math-verify worker pool for the session: starting processes is the slow part.
    from r1_lightning.rewards import Accuracy

    reward = Accuracy()
    yield reward
    reward.close()
