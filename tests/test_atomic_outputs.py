"""Outputs are replaced whole or not at all: a failed or killed write leaves the previous version readable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cli_env

from r1_lightning.atomic import directory_writer, remove_stray_temporaries, write_text_atomic
from r1_lightning.callbacks import RejectionSamplingWriter
from r1_lightning.errors import UserError
from r1_lightning.export import save_hf_directory
from r1_lightning.policy import load_model, load_tokenizer

# Exports builtin:tiny-small into argv[1] under a 64 KiB file-size limit (RLIMIT_FSIZE), twice: first with
# SIGXFSZ ignored (Python's default), so the write past the limit fails with EFBIG as on a full disk; then
# with SIGXFSZ's default action, which kills the process mid-write as a kill or a crash would.
_EXPORT = """
import resource, signal, sys
from pathlib import Path
from r1_lightning.export import save_hf_directory
from r1_lightning.policy import load_model, load_tokenizer

tokenizer = load_tokenizer("builtin:tiny-small")
model = load_model("builtin:tiny-small", vocab_size=len(tokenizer), seed=1)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    save_hf_directory(Path(sys.argv[1]), model, tokenizer)
except Exception as error:  # OSError, or safetensors' error wrapping it
    print(f"failed: {error}", flush=True)
    sys.stdin.readline()  # the test looks at the directory now
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
save_hf_directory(Path(sys.argv[1]), model, tokenizer)
"""


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ semantics")
def test_a_failed_or_killed_export_leaves_the_previous_one_whole(tmp_path) -> None:
    target = tmp_path / "hf_model"
    tokenizer = load_tokenizer("builtin:tiny-small")
    save_hf_directory(target, load_model("builtin:tiny-small", vocab_size=len(tokenizer)), tokenizer)
    before = _contents(target)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= before.keys()

    job = subprocess.Popen([sys.executable, "-c", _EXPORT, str(target)], env=cli_env(), text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = job.stdout.readline()  # config.json fits under the limit, the weights do not
    assert line.startswith("failed:") and "File too large" in line, line
    assert _contents(target) == before  # not a new config.json beside the old weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"]  # the temporary directory is gone

    job.communicate("go\n", timeout=300)  # the second save is killed by SIGXFSZ mid-write
    assert job.returncode == -signal.SIGXFSZ
    assert _contents(target) == before
    (stray,) = tmp_path.glob(".hf_model.tmp-*")  # what a kill leaves ...
    assert remove_stray_temporaries(tmp_path) == [stray]  # ... goes at the next start (its process is gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"]


def test_a_directory_moved_aside_by_a_killed_swap_is_put_back(tmp_path) -> None:
    # A kill between "old version aside" and "new version in": the old one comes back, never nothing.
    old = tmp_path / ".hf_model.old-99999999"  # pid 99999999 cannot exist
    old.mkdir()
    (old / "config.json").write_text("{}")
    (tmp_path / ".stage.json.tmp-99999999").write_text("half")
    remove_stray_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"] and (tmp_path / "hf_model" / "config.json").is_file()
    # A successful swap replaces the directory whole; a body that raises changes nothing.
    with directory_writer(tmp_path / "hf_model") as temporary:
        (temporary / "weights").write_text("new")
    assert sorted(p.name for p in (tmp_path / "hf_model").iterdir()) == ["weights"]
    with pytest.raises(RuntimeError), directory_writer(tmp_path / "hf_model") as temporary:
        (temporary / "weights").write_text("newer")
        raise RuntimeError("disk full")
    assert (tmp_path / "hf_model" / "weights").read_text() == "new" and len(list(tmp_path.iterdir())) == 1
    write_text_atomic(tmp_path / "stage.json", '{"stage": "sft"}')
    assert json.loads((tmp_path / "stage.json").read_text()) == {"stage": "sft"}


def test_rejection_sampling_that_accepts_nothing_keeps_the_earlier_file_and_says_so(tmp_path) -> None:
    output = tmp_path / "accepted.jsonl"
    output.write_text('{"prompt": "earlier", "completion": "run"}\n')
    writer = RejectionSamplingWriter(str(output), require=["accuracy"])
    strategy = SimpleNamespace(barrier=lambda *args: None, reduce=lambda tensor, reduce_op: tensor)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_rank=0, world_size=1, is_global_zero=True, strategy=strategy, loggers=[])
    module = SimpleNamespace(device=torch.device("cpu"))
    completion = "<think>\nx\n</think>\n<answer>\n3\n</answer>"
    prediction = {  # 2 prompts x 3 samples, every one wrong
        "indices": [0, 1], "prompts": ["Compute 0.", "Compute 1."], "columns": {"answer": ["0", "1"]}, "num_generations": 3,
        "completions": [completion] * 6, "lengths": [20] * 6, "truncated": [False] * 6, "total": [1.0] * 6,
        "scores": {"accuracy": [0.0] * 6, "lenient_format": [1.0] * 6},
    }
    writer.on_predict_start(trainer, module)
    writer.write_on_batch_end(trainer, module, prediction, None, None, 0)
    with pytest.raises(UserError, match=r"accepted none of 6 samples \(rejected: accuracy 6\); .* was not written \(an earlier file"):
        writer.on_predict_epoch_end(trainer, module)
    assert output.read_text() == '{"prompt": "earlier", "completion": "run"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accepted.jsonl"]  # no share left behind
