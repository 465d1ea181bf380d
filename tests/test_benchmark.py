"""The side-by-side benchmark against TRL runs end to end in its CI-sized mode (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the benchmark needs the bench extra (pip install -e '.[bench]')")
pytest.importorskip("psutil", reason="the benchmark needs the bench extra (pip install -e '.[bench]')")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_vs_trl.py"


@pytest.mark.slow
def test_quick_benchmark_prints_a_parsable_json_summary(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert {"config", "machine", "ours", "trl", "ratios", "generation", "targets"} <= result.keys()
    for system in ("ours", "trl"):
        assert {"s_per_step", "tokens_per_s", "completion_tokens_per_s", "peak_rss_mib", "runs"} <= result[system].keys()
        assert result[system]["tokens_per_s"] > 0 and result[system]["peak_rss_mib"] > 0
    assert {"s_per_step", "tokens_per_s", "peak_rss_mib"} <= result["ratios"].keys()
    assert {"ours_tokens_per_s", "generate_tokens_per_s", "ratio"} <= result["generation"].keys()
    assert all(run["compiled"] for run in result["ours"]["runs"])  # GRPO(compile=True) ran compiled, no fallback
    # Identical work: same prompts per step, G and token budget on both sides.
    assert result["config"]["quick"] and result["config"]["prompts"] * result["config"]["num_generations"] == 64
