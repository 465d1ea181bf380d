"""Side-by-side benchmark: r1-lightning's GRPO against Hugging Face TRL's GRPOTrainer.

Both systems do exactly the same work: the same model directory (one tiny Qwen2-shaped model
built here), the same prompts in the same order, G completions per prompt, prompts per step,
prompt/completion lengths, temperature, β, μ = 1, AdamW (lr, betas, weight decay, grad
clipping), number of steps and device, and the same plain reward function. Ours runs through a
real ``lightning.Trainer``, TRL through its real ``GRPOTrainer``. Each run is its own
subprocess (so peak memory does not mix), and the runs alternate ours / TRL / ours / TRL …
so that load from other processes on the machine hits both sides alike.

Measured per run: seconds per step (median after warm-up; a callback on each side records step
boundaries), tokens per second (prompt + completion tokens processed, summed over the measured
steps, divided by their time: the measure verl and NeMo-RL report), and peak resident memory
(the kernel's high-water mark, ``ru_maxrss``, cross-checked by a psutil sampler). A separate
subprocess times our rollout engine against plain ``model.generate`` on the same batch.

Usage::

    python benchmarks/grpo_vs_trl.py                    # default tiny config, 3 rounds (~3 min)
    python benchmarks/grpo_vs_trl.py --vocab 151936     # Qwen-sized vocabulary: the logits cost (~12 min)
    python benchmarks/grpo_vs_trl.py --quick            # CI-sized (under a minute)
    python benchmarks/grpo_vs_trl.py --device cuda      # GPU machines

Both sides run with ``torch.set_num_threads(--threads)`` (default 1; see benchmarks/README.md).

The last line printed is one JSON object (``{"config", "machine", "ours", "trl", "ratios",
"generation", "targets"}``). Needs the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "
SYSTEMS = ("ours", "trl")


# ----------------------------------------------------------------------------------- shared
def digit_reward(completions, **kwargs):
    """Fraction of digit characters: cheap, deterministic, and it varies within a group."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: 1 round of 3 steps, short generation timing")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=None, help="pad the vocabulary to this size (e.g. 151936, Qwen2's)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8; 3 with --vocab > 32k or --quick)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 2; 1 with --vocab > 32k or --quick)")
    p.add_argument("--rounds", type=int, default=None, help="ours/TRL pairs (default 3; 1 with --vocab > 32k or --quick)")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed generate calls per engine (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1: see benchmarks/README.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="ours,trl", help="which systems to run (comma-separated; for profiling)")
    p.add_argument("--no-generation", action="store_true", help="skip the rollout-engine vs model.generate timing")
    p.add_argument(
        "--no-compile", action="store_true",
        help="run our training forwards eagerly (default: GRPO(compile=True), compiled decoder layers; see benchmarks/README.md)",
    )
    p.add_argument("--workdir", default=None, help="keep the model, prompts and run logs here")
    p.add_argument("--role", default="main", choices=["main", "build", "ours", "trl", "generation"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    big = (args.vocab or 0) > 32_768
    small = args.quick or big
    args.steps = args.steps or (3 if small else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 2)
    args.rounds = args.rounds or (1 if small else 3)
    args.gen_repeats = args.gen_repeats or (2 if args.quick else 5)
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be < --steps ({args.steps})")
    return args


def _setup_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    return torch


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class PeakMemory:
    """Peak RSS of this process: the kernel's high-water mark, cross-checked by a psutil sampler."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._process, self._interval, self._stop = psutil.Process(), interval, threading.Event()
        self.sampled = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sampled = max(self.sampled, self._process.memory_info().rss)

    def mark_start(self) -> None:
        """RSS when the first step starts: imports, model, optimizer and data are in; nothing has run."""
        self.at_start = self._process.memory_info().rss

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {
            "peak_rss_mib": max(hwm, self.sampled) / 2**20,
            "peak_rss_sampled_mib": self.sampled / 2**20,
            "rss_at_first_step_mib": getattr(self, "at_start", 0) / 2**20,
        }


def _emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _step_summary(
    times: list[float], tokens: list[int], completion_tokens: list[int], warmup: int, cpu_times: list[float]
) -> dict:
    """Wall-clock step times are what a user waits; process CPU seconds per step are the same work with the
    time other jobs held the CPU left out (one thread: equal to wall-clock on an idle machine)."""
    t, n, c, cpu = times[warmup:], tokens[warmup:], completion_tokens[warmup:], cpu_times[warmup:]
    return {
        "s_per_step": statistics.median(t),
        "tokens_per_s": sum(n) / sum(t),
        "completion_tokens_per_s": sum(c) / sum(t),
        "tokens_per_step": sum(n) / len(n),
        "first_step_s": times[0],
        "cpu_s_per_step": statistics.median(cpu),
        "tokens_per_cpu_s": sum(n) / sum(cpu),
        "step_times": [round(x, 4) for x in times],
        "step_cpu_times": [round(x, 4) for x in cpu_times],
        "step_tokens": tokens,
    }


# ------------------------------------------------------------------------------ the assets
def build_assets(args) -> None:
    """The model directory and the prompt file both systems read."""
    torch = _setup_torch(args)
    from r1_lightning.data.tasks import ArithmeticTask
    from r1_lightning.policy import build_builtin_tokenizer, encode_prompt, load_model, render_prompt

    work = Path(args.workdir)
    tokenizer = build_builtin_tokenizer()
    model = load_model("builtin:tiny", seed=args.seed)
    if args.vocab and args.vocab != model.config.vocab_size:
        model = _pad_vocabulary(model, args.vocab, torch)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")

    rows = ArithmeticTask().rows("rl", args.prompts * args.steps)
    with open(work / "prompts.jsonl", "w") as f:
        for row in rows:
            text = render_prompt(tokenizer, row["prompt"])
            ids = encode_prompt(tokenizer, text)
            assert len(ids) <= args.max_prompt_length, f"prompt of {len(ids)} tokens > --max-prompt-length"
            # `prompt` feeds our PromptDataModule (which applies the chat template), `prompt_text` TRL (as is).
            f.write(json.dumps({"prompt": row["prompt"], "prompt_text": text, "answer": row["answer"]}) + "\n")
    params = sum(p.numel() for p in model.parameters())
    _emit({"parameters": params, "vocab_size": model.config.vocab_size, "prompts": len(rows)})


def _pad_vocabulary(model, vocab_size: int, torch):
    """The same network with its (tied) embedding padded to ``vocab_size`` rows: token ids unchanged."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**model.config.to_dict(), "vocab_size": vocab_size})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        padded = Qwen2ForCausalLM(config)
    state = model.state_dict()
    with torch.no_grad():
        rows = state.pop("model.embed_tokens.weight")
        padded.model.embed_tokens.weight[: rows.shape[0]] = rows
        state.pop("lm_head.weight", None)  # tied
        missing, unexpected = padded.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"model.embed_tokens.weight", "lm_head.weight"}, (missing, unexpected)
    return padded


def _load_rows(args) -> list[dict]:
    with open(Path(args.workdir) / "prompts.jsonl") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------ ours
def run_ours(args) -> None:
    torch = _setup_torch(args)
    memory = PeakMemory()
    import lightning as L

    from r1_lightning import GRPO, PromptDataModule

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.last, self.times, self.tokens, self.completion_tokens = None, [], [], []
            self.cpu_last, self.cpu_times = None, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.last is None:
                memory.mark_start()
                _sync(args.device)
                self.last, self.cpu_last = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(args.device)
            now, cpu_now = time.perf_counter(), time.process_time()
            self.times.append(now - self.last)
            self.cpu_times.append(cpu_now - self.cpu_last)
            self.last, self.cpu_last = now, cpu_now
            rollout = outputs["rollout"].rollout
            completion = int(rollout.completion_mask.sum())
            self.tokens.append(int(rollout.prompt_mask.sum()) + completion)
            self.completion_tokens.append(completion)

    work = Path(args.workdir)
    L.seed_everything(args.seed, verbose=False)
    module = GRPO(
        model_name_or_path=str(work / "model"), rewards=[digit_reward], num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, beta=args.beta, learning_rate=args.lr,
        weight_decay=0.0, warmup_steps=0, max_grad_norm=1.0, export_hf=False, seed=args.seed,
        compile=not args.no_compile,
    )
    data = PromptDataModule(
        path=str(work / "prompts.jsonl"), batch_size=args.prompts, max_prompt_length=args.max_prompt_length, shuffle=False,
    )
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps, accelerator=args.device, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer], default_root_dir=str(work / "ours_run"),
    )
    trainer.fit(module, datamodule=data)
    summary = _step_summary(timer.times, timer.tokens, timer.completion_tokens, args.warmup, timer.cpu_times)
    from r1_lightning.engines.compiled_forward import ran_compiled

    result = {"system": "ours", **summary, **memory.stop(), "compiled": ran_compiled()}
    if args.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    _emit(result)


# ------------------------------------------------------------------------------------- TRL
def run_trl(args) -> None:
    torch = _setup_torch(args)
    memory = PeakMemory()
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.last, self.seen, self.times, self.tokens = None, 0, [], []
            self.cpu_last, self.cpu_times = None, []

        def on_step_begin(self, train_args, state, control, **kwargs):
            if self.last is None:
                memory.mark_start()
                _sync(args.device)
                self.last, self.seen, self.cpu_last = time.perf_counter(), state.num_input_tokens_seen, time.process_time()

        def on_step_end(self, train_args, state, control, **kwargs):
            _sync(args.device)
            now, cpu_now = time.perf_counter(), time.process_time()
            self.times.append(now - self.last)
            self.cpu_times.append(cpu_now - self.cpu_last)
            self.tokens.append(int(state.num_input_tokens_seen - self.seen))  # prompt + completion tokens
            self.last, self.seen, self.cpu_last = now, state.num_input_tokens_seen, cpu_now

    work = Path(args.workdir)
    rows = _load_rows(args)
    dataset = Dataset.from_list([{"prompt": r["prompt_text"], "answer": r["answer"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    config = GRPOConfig(
        output_dir=str(work / "trl_run"), per_device_train_batch_size=args.prompts * args.num_generations,
        gradient_accumulation_steps=1, num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, beta=args.beta, num_iterations=1, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, max_steps=args.steps,
        shuffle_dataset=False, seed=args.seed, use_cpu=args.device == "cpu", bf16=False, fp16=False,
        save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False, model_init_kwargs={"dtype": torch.float32},
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=str(work / "model"), reward_funcs=[digit_reward], args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[timer],
    )
    completion_tokens = _CompletionTokens(trainer)
    trainer.train()
    summary = _step_summary(timer.times, timer.tokens, completion_tokens.per_step, args.warmup, timer.cpu_times)
    result = {"system": "trl", **summary, **memory.stop()}
    if args.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    _emit(result)


class _CompletionTokens:
    """Completion tokens per TRL step, read from the mask its loss sees (TRL logs only cumulative totals)."""

    def __init__(self, trainer) -> None:
        self.per_step: list[int] = []
        original = trainer._generate_and_score_completions

        def wrapped(*a, **kw):
            out = original(*a, **kw)
            self.per_step.append(int(out["completion_mask"].sum()))
            return out

        trainer._generate_and_score_completions = wrapped


# ------------------------------------------------------------------------------ generation
def run_generation(args) -> None:
    """Our rollout engine vs plain ``model.generate`` on the same batch, EOS off so both make N×T tokens."""
    torch = _setup_torch(args)
    from transformers import GenerationConfig

    from r1_lightning.policy import encode_prompt, load_model, load_tokenizer, render_prompt
    from r1_lightning.engines.base import SamplingParams, left_pad
    from r1_lightning.engines.hf import HFGenerateEngine

    work = Path(args.workdir)
    tokenizer = load_tokenizer(str(work / "model"))
    model = load_model(str(work / "model")).to(args.device).eval()
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, r["prompt"])) for r in _load_rows(args)[: args.prompts]]
    G, T = args.num_generations, args.max_new_tokens
    engine = HFGenerateEngine()
    params = SamplingParams(max_new_tokens=T, temperature=args.temperature, eos_token_ids=[], pad_token_id=tokenizer.pad_token_id)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, args.device)
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    config = GenerationConfig(
        do_sample=True, max_new_tokens=T, temperature=args.temperature, top_k=0, top_p=1.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=None, bos_token_id=None,
    )

    def ours() -> int:
        rollout = engine.generate(model, prompts, G, params, torch.Generator(args.device).manual_seed(0))
        return int(rollout.completion_mask.sum())

    def hf() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    times = {"ours": [], "generate": []}
    tokens = {}
    for repeat in range(args.gen_repeats + 1):  # the first pair warms up
        for name, fn in (("ours", ours), ("generate", hf)):
            _sync(args.device)
            start = time.perf_counter()
            tokens[name] = fn()
            _sync(args.device)
            if repeat:
                times[name].append(time.perf_counter() - start)
    result = {f"{k}_tokens_per_s": tokens[k] / statistics.median(v) for k, v in times.items()}
    result.update({f"{k}_s": [round(x, 4) for x in v] for k, v in times.items()}, completion_tokens=tokens["ours"])
    assert tokens["ours"] == tokens["generate"], tokens
    result["ratio"] = result["ours_tokens_per_s"] / result["generate_tokens_per_s"]
    _emit(result)


# ------------------------------------------------------------------------------ orchestrator
def _child(args, role: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--role", role, "--workdir", args.workdir]
    for name in ("device", "prompts", "num_generations", "max_new_tokens", "max_prompt_length", "temperature", "beta", "lr",
                 "steps", "warmup", "rounds", "gen_repeats", "threads", "seed"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.vocab:
        argv += ["--vocab", str(args.vocab)]
    if args.no_compile:
        argv.append("--no-compile")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=args.workdir)
    log = Path(args.workdir) / f"{role}.log"
    with open(log, "a") as f:
        f.write(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"benchmark role {role!r} failed (exit {proc.returncode}); log: {log}\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


def _machine(args) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "lightning", "transformers", "trl"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "device": args.device, "python": platform.python_version(), **versions}


def _aggregate(runs: list[dict]) -> dict:
    keys = (
        "s_per_step", "tokens_per_s", "completion_tokens_per_s", "tokens_per_step", "first_step_s", "cpu_s_per_step",
        "tokens_per_cpu_s",
    )
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    out["rss_at_first_step_mib"] = statistics.median(r["rss_at_first_step_mib"] for r in runs)
    if "peak_cuda_mib" in runs[0]:
        out["peak_cuda_mib"] = max(r["peak_cuda_mib"] for r in runs)
    out["runs"] = runs
    return out


def _table(result: dict) -> str:
    ours, trl, ratios = result["ours"], result["trl"], result["ratios"]
    rows = [
        ("s / step (median)", "s_per_step", "{:.3f}"),
        ("tokens / s (prompt+completion)", "tokens_per_s", "{:,.0f}"),
        ("completion tokens / s", "completion_tokens_per_s", "{:,.0f}"),
        ("tokens / step", "tokens_per_step", "{:,.0f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}"),
        ("CPU s / step (median)", "cpu_s_per_step", "{:.3f}"),
        ("tokens / CPU-s", "tokens_per_cpu_s", "{:,.0f}"),
        ("first step (s, warm-up)", "first_step_s", "{:.1f}"),
    ]
    if "peak_cuda_mib" in ours:
        rows.append(("peak CUDA allocated (MiB)", "peak_cuda_mib", "{:,.0f}"))
    lines = [f"{'':32s}{'ours':>14s}{'TRL':>14s}{'ours/TRL':>10s}", "-" * 70]
    for label, key, fmt in rows:
        lines.append(f"{label:32s}{fmt.format(ours[key]):>14s}{fmt.format(trl[key]):>14s}{ratios[key]:>10.2f}")
    gen = result.get("generation")
    if gen:
        lines.append("-" * 70)
        lines.append(
            f"{'generation tokens / s':32s}{gen['ours_tokens_per_s']:>14,.0f}{gen['generate_tokens_per_s']:>14,.0f}{gen['ratio']:>10.2f}"
            "   (TRL column: plain model.generate)"
        )
    return "\n".join(lines)


def main(args) -> dict:
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: choose from {SYSTEMS}")
    import importlib.util

    missing = [name for name in ("psutil", *(["trl"] if "trl" in systems else [])) if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"benchmarks/grpo_vs_trl.py needs {', '.join(missing)}: pip install -e '.[bench]'")
    owned = args.workdir is None
    tmp = tempfile.TemporaryDirectory(prefix="grpo_vs_trl_") if owned else None
    args.workdir = os.path.abspath(tmp.name if owned else args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    try:
        assets = _child(args, "build")
        print(f"model: {assets['parameters']:,} parameters, vocabulary {assets['vocab_size']:,}; {assets['prompts']} prompts", flush=True)
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for round_index in range(args.rounds):
            order = systems if round_index % 2 == 0 else systems[::-1]
            for system in order:
                run = _child(args, system)
                runs[system].append(run)
                print(
                    f"round {round_index + 1}/{args.rounds} {system:4s}: {run['s_per_step']:.3f} s/step, "
                    f"{run['tokens_per_s']:,.0f} tokens/s, {run['cpu_s_per_step']:.3f} CPU-s/step, "
                    f"peak RSS {run['peak_rss_mib']:,.0f} MiB (wall {run['wall_s']:.0f} s)",
                    flush=True,
                )
        result = {"config": {k: v for k, v in vars(args).items() if k not in ("role", "workdir")}, "machine": _machine(args)}
        result["config"]["parameters"] = assets["parameters"]
        result["config"]["vocab_size"] = assets["vocab_size"]
        for system in systems:
            result[system] = _aggregate(runs[system])
        if len(systems) == 2:
            keys = (
                "s_per_step", "tokens_per_s", "completion_tokens_per_s", "tokens_per_step", "peak_rss_mib",
                "rss_at_first_step_mib", "cpu_s_per_step", "tokens_per_cpu_s", "first_step_s",
            )
            ratios = {k: result["ours"][k] / result["trl"][k] for k in keys}
            if "peak_cuda_mib" in result["ours"]:
                ratios["peak_cuda_mib"] = result["ours"]["peak_cuda_mib"] / result["trl"]["peak_cuda_mib"]
            # Paired ratios (each ours run against the TRL run next to it): robust to slow drifts in machine load.
            ratios["tokens_per_s_paired"] = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(runs["ours"], runs["trl"])]
            ratios["tokens_per_cpu_s_paired"] = [
                o["tokens_per_cpu_s"] / t["tokens_per_cpu_s"] for o, t in zip(runs["ours"], runs["trl"])
            ]
            result["ratios"] = ratios
        result["generation"] = None if args.no_generation else _child(args, "generation")
        if len(systems) == 2:
            result["targets"] = {
                "tokens_per_s_ratio_min": 2.0,
                "tokens_per_s_met": result["ratios"]["tokens_per_s"] >= 2.0,
                "peak_rss_ratio_max": 0.5,
                "peak_rss_met": result["ratios"]["peak_rss_mib"] <= 0.5,
            }
            print()
            print(_table(result))
            if not args.no_compile and not all(run.get("compiled") for run in runs["ours"]):
                print("note: our training forwards ran eagerly (compile=True did not apply or failed; see ours.log)")
        print(json.dumps(result))
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    arguments = parse_args()
    roles = {"build": build_assets, "ours": run_ours, "trl": run_trl, "generation": run_generation}
    if arguments.role == "main":
        main(arguments)
    else:
        roles[arguments.role](arguments)
