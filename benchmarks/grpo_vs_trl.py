"""Side-by-side benchmark: r1-lightning's GRPO against Hugging Face TRL's GRPOTrainer.

Both systems do exactly the same work: the same model directory (a tiny Qwen2-shaped model
built here, or with ``--workload real`` the packaged SmolLM2-135M-Instruct), the same prompts in the same order, G completions per prompt, prompts per step,
prompt/completion lengths, temperature, β, μ = 1, AdamW (lr, betas, weight decay, grad
clipping), number of steps and device, and the same plain reward function. Ours runs through a
real ``lightning.Trainer``, TRL through its real ``GRPOTrainer``. Each run is its own
subprocess (so peak memory does not mix), and the runs alternate ours / TRL / ours / TRL …
so that load from other processes on the machine hits both sides alike.

Measured per run: seconds per step (median after warm-up; a callback on each side records step
boundaries), tokens per second (prompt + completion tokens processed, summed over the measured
steps, divided by their time: the measure verl and NeMo-RL report), and peak resident memory
(the kernel's high-water mark, ``ru_maxrss``, cross-checked by a psutil sampler). A separate
subprocess times our rollout engine against plain ``model.generate`` on the same batch. Each step is
also split into phases (generation, rewards, reference log-probs, policy forward, backward,
optimizer, weight sync, other) by timed wrappers around each system's own methods
(``bench_common.PhaseClock``). A run past ``--memory-cap-gib`` of resident memory stops and is
reported as out of memory.

Usage::

    python benchmarks/grpo_vs_trl.py                    # default tiny config, 3 rounds (~3 min)
    python benchmarks/grpo_vs_trl.py --vocab 151936     # Qwen-sized vocabulary: the logits cost (~12 min)
    python benchmarks/grpo_vs_trl.py --quick            # CI-sized (under a minute)
    python benchmarks/grpo_vs_trl.py --workload real    # SmolLM2-135M, 4 prompts x 8, 128 tokens, 5 pairs (hours on 1 core)
    python benchmarks/grpo_vs_trl.py --vocab 151936 --lengths 256,512,1024,2048   # cost growth, forced lengths, plot
    python benchmarks/grpo_vs_trl.py --workload real --lengths 128,256,512
    python benchmarks/grpo_vs_trl.py --device cuda      # GPU machines

Both sides run with ``torch.set_num_threads(--threads)`` (default 1; see benchmarks/README.md).

The last line printed is one JSON object (``{"config", "machine", "ours", "trl", "ratios",
"generation", "targets"}``; with ``--lengths``: ``{"config", "machine", "lengths", "plot"}``). Needs the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_report as report
from bench_common import OUT_OF_MEMORY_EXIT, RESULT_PREFIX, PeakMemory, PhaseClock, emit, step_summary, sync

SYSTEMS = ("ours", "trl")
REAL_MODEL = "builtin:smollm2-135m-instruct"


# ----------------------------------------------------------------------------------- shared
def digit_reward(completions, **kwargs):
    """Fraction of digit characters: cheap, deterministic, dense (it varies within every group)."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: 1 round of 3 steps, short generation timing")
    p.add_argument("--workload", default="tiny", choices=["tiny", "real"],
                   help=f"tiny: the built-in 0.8M model (or --vocab); real: {REAL_MODEL} (134.5M parameters, 4 prompts x 8, 128 tokens)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated completion lengths, each forced to full length on both sides (EOS suppressed): a cost-growth sweep")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=None, help="pad the tiny model's vocabulary to this size (e.g. 151936, Qwen2's)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; real 4; --lengths 2)")
    p.add_argument("--num-generations", type=int, default=None, help="G, completions per prompt (default 8; --lengths 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64; real 128")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default 64; real 160")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8; 3 with --quick, --vocab > 32k or real; 2 with --lengths)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 2; 1 with --quick, --vocab > 32k, real or --lengths)")
    p.add_argument("--rounds", type=int, default=None, help="ours/TRL pairs (default 3; real 5; 1 with --quick, --vocab > 32k or --lengths)")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed generate calls per engine (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1: see benchmarks/README.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="ours,trl", help="which systems to run (comma-separated; for profiling)")
    p.add_argument("--no-generation", action="store_true", help="skip the rollout-engine vs model.generate timing")
    p.add_argument("--compile", default="default", choices=["default", "on", "off"],
                   help="our GRPO(compile=...): default leaves the project's default (auto), on/off force it")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="the same as --compile off")
    p.add_argument("--gradient-checkpointing", default="default", choices=["default", "auto", "true", "false"],
                   help="our GRPO(gradient_checkpointing=...): default leaves the project's default (auto)")
    p.add_argument("--trl-compile", action="store_true", help="TRL with its torch_compile option (compiles the whole model)")
    p.add_argument("--trl-continuous-batching", action="store_true",
                   help="TRL generating through transformers' continuous batching (use_transformers_continuous_batching)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm", "vllm-ours"],
                   help="generation: hf (each side's default), vllm (ours VLLMEngine, TRL use_vllm colocate) or vllm-ours (ours only)")
    p.add_argument("--memory-cap-gib", type=float, default=10.0,
                   help="a run past this resident memory stops and is reported as out of memory (default 10)")
    p.add_argument("--plot", default=None, help="with --lengths: save the log-log plot here (default benchmarks/lengths_<model>.png)")
    p.add_argument("--workdir", default=None, help="keep the model, prompts and run logs here")
    p.add_argument("--force-length", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--role", default="main", choices=["main", "build", "ours", "trl", "generation"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    real, sweep = args.workload == "real", args.lengths is not None
    big = (args.vocab or 0) > 32_768
    small = args.quick or big or real
    if real and args.vocab:
        p.error("--vocab applies to the tiny workload only")
    args.prompts = args.prompts or (2 if sweep else 4 if real else 8)
    args.num_generations = args.num_generations or (4 if sweep else 8)
    args.max_new_tokens = args.max_new_tokens or (128 if real else 64)
    args.max_prompt_length = args.max_prompt_length or (160 if real else 64)
    args.steps = args.steps or (2 if sweep else 3 if small else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if small or sweep else 2)
    args.rounds = args.rounds or (1 if args.quick or big or sweep else 5 if real else 3)
    args.gen_repeats = args.gen_repeats or (2 if args.quick else 5)
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be < --steps ({args.steps})")
    if sweep:
        try:
            args.length_list = [int(x) for x in args.lengths.split(",") if x]
        except ValueError:
            p.error(f"--lengths {args.lengths!r}: comma-separated integers, e.g. 256,512,1024")
    return args


def _setup_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    return torch


# ------------------------------------------------------------------------------ the assets
def build_assets(args) -> None:
    """The model directory and the prompt file both systems read."""
    torch = _setup_torch(args)
    from r1_lightning.data.tasks import ArithmeticTask
    from r1_lightning.policy import build_builtin_tokenizer, encode_prompt, load_model, load_tokenizer, render_prompt

    work = Path(args.workdir)
    if args.workload == "real":  # the packaged .gguf, dequantised to float32 and saved as a plain Hugging Face directory
        tokenizer, model = load_tokenizer(REAL_MODEL), load_model(REAL_MODEL, dtype="float32")
    else:
        tokenizer, model = build_builtin_tokenizer(), load_model("builtin:tiny", seed=args.seed)
    if args.vocab and args.vocab != model.config.vocab_size:
        model = _pad_vocabulary(model, args.vocab, torch)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")

    task = ArithmeticTask(prompt_style="words" if args.workload == "real" else "compute")
    rows = task.rows("rl", args.prompts * args.steps)
    with open(work / "prompts.jsonl", "w") as f:
        for row in rows:
            text = render_prompt(tokenizer, row["prompt"])
            ids = encode_prompt(tokenizer, text)
            assert len(ids) <= args.max_prompt_length, f"prompt of {len(ids)} tokens > --max-prompt-length"
            # `prompt` feeds our PromptDataModule (which applies the chat template), `prompt_text` TRL (as is).
            f.write(json.dumps({"prompt": row["prompt"], "prompt_text": text, "answer": row["answer"], "prompt_tokens": len(ids)}) + "\n")
    params = sum(p.numel() for p in model.parameters())
    mean_prompt = sum(len(encode_prompt(tokenizer, render_prompt(tokenizer, r["prompt"]))) for r in rows) / len(rows)
    emit({"parameters": params, "vocab_size": model.config.vocab_size, "prompts": len(rows), "mean_prompt_tokens": mean_prompt})


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
    memory = PeakMemory("ours", args.memory_cap_gib)
    clock = PhaseClock(args.device)
    import lightning as L

    from r1_lightning import GRPO, PromptDataModule

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.last, self.times, self.tokens, self.completion_tokens = None, [], [], []
            self.cpu_last, self.cpu_times = None, []

        def on_train_start(self, trainer, pl_module) -> None:
            optimizer = trainer.optimizers[0]
            clock.wrap(optimizer, "step", "optimizer")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.last is None:
                memory.mark_start()
                sync(args.device)
                self.last, self.cpu_last = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(args.device)
            now, cpu_now = time.perf_counter(), time.process_time()
            self.times.append(now - self.last)
            clock.end_step(now - self.last, cpu_now - self.cpu_last)
            self.cpu_times.append(cpu_now - self.cpu_last)
            self.last, self.cpu_last = now, cpu_now
            rollout = outputs["rollout"].rollout
            completion = int(rollout.completion_mask.sum())
            self.tokens.append(int(rollout.prompt_mask.sum()) + completion)
            self.completion_tokens.append(completion)

    work = Path(args.workdir)
    L.seed_everything(args.seed, verbose=False)
    engine = {}
    if args.engine in ("vllm", "vllm-ours"):
        from r1_lightning.engines import VLLMEngine

        engine = {"rollout_engine": VLLMEngine(max_model_len=args.max_prompt_length + args.max_new_tokens, seed=args.seed)}
    module = GRPO(
        model_name_or_path=str(work / "model"), rewards=[digit_reward], num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, beta=args.beta, learning_rate=args.lr,
        weight_decay=0.0, warmup_steps=0, max_grad_norm=1.0, export_hf=False, seed=args.seed,
        **({} if args.compile == "default" else {"compile": args.compile == "on"}), **engine,
        **({} if args.gradient_checkpointing == "default"
           else {"gradient_checkpointing": {"auto": "auto", "true": True, "false": False}[args.gradient_checkpointing]}),
    )
    if args.force_length:  # every completion runs to max_new_tokens: no token ends it
        original = module.sampling_params
        module.sampling_params = lambda evaluation=False: dataclasses.replace(original(evaluation), eos_token_ids=[])
    # Phases: the sampling call holds generation, detokenising and the rewards; generation is timed inside it.
    clock.wrap(module, "_sample", "rewards")
    clock.wrap(module.engine, "generate", "generation")
    clock.wrap(module.engine, "sync_weights", "weight_sync")
    clock.wrap(module, "_ref_logprobs", "reference")
    clock.wrap(module, "_old_logprobs", "old_logprobs")
    clock.wrap(module, "_policy_logprobs", "policy_forward")
    clock.wrap(module, "manual_backward", "backward")
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
    summary = step_summary(timer.times, timer.tokens, timer.completion_tokens, args.warmup, timer.cpu_times, clock)
    from r1_lightning.engines.compiled_forward import ran_compiled

    result = {"system": "ours", **summary, **memory.stop(), "compiled": ran_compiled()}
    if args.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    emit(result)


# ------------------------------------------------------------------------------------- TRL
def run_trl(args) -> None:
    torch = _setup_torch(args)
    memory = PeakMemory("trl", args.memory_cap_gib)
    clock = PhaseClock(args.device)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.last, self.seen, self.times, self.tokens = None, 0, [], []
            self.cpu_last, self.cpu_times = None, []

        def on_train_begin(self, train_args, state, control, optimizer=None, **kwargs):
            clock.wrap(optimizer, "step", "optimizer")

        def on_step_begin(self, train_args, state, control, **kwargs):
            if self.last is None:
                memory.mark_start()
                sync(args.device)
                self.last, self.seen, self.cpu_last = time.perf_counter(), state.num_input_tokens_seen, time.process_time()

        def on_step_end(self, train_args, state, control, **kwargs):
            sync(args.device)
            now, cpu_now = time.perf_counter(), time.process_time()
            self.times.append(now - self.last)
            clock.end_step(now - self.last, cpu_now - self.cpu_last)
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
        torch_compile=args.trl_compile, use_transformers_continuous_batching=args.trl_continuous_batching,
        **({"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": args.max_prompt_length + args.max_new_tokens}
           if args.engine == "vllm" else {}),
        # Forced length: EOS gets probability 0 until max_new_tokens (transformers' MinNewTokensLogitsProcessor).
        generation_kwargs={"min_new_tokens": args.max_new_tokens} if args.force_length else None,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=str(work / "model"), reward_funcs=[digit_reward], args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[timer],
    )
    completion_tokens = _CompletionTokens(trainer)

    def logprob_phase(model, *a, **kw) -> str:
        if torch.is_grad_enabled():
            return "policy_forward"
        return "reference" if model is trainer.ref_model else "old_logprobs"

    clock.wrap(trainer, "_generate_single_turn", "generation")
    clock.wrap(trainer, "_calculate_rewards", "rewards")
    clock.wrap(trainer, "_get_per_token_logps_and_entropies", logprob_phase)
    clock.wrap(trainer.accelerator, "backward", "backward")
    if args.engine == "vllm":
        clock.wrap(trainer.vllm_generation, "sync_weights", "weight_sync")
    trainer.train()
    summary = step_summary(timer.times, timer.tokens, completion_tokens.per_step, args.warmup, timer.cpu_times, clock)
    result = {"system": "trl", **summary, **memory.stop()}
    if args.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    emit(result)


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
            sync(args.device)
            start = time.perf_counter()
            tokens[name] = fn()
            sync(args.device)
            if repeat:
                times[name].append(time.perf_counter() - start)
    result = {f"{k}_tokens_per_s": tokens[k] / statistics.median(v) for k, v in times.items()}
    result.update({f"{k}_s": [round(x, 4) for x in v] for k, v in times.items()}, completion_tokens=tokens["ours"])
    assert tokens["ours"] == tokens["generate"], tokens
    result["ratio"] = result["ours_tokens_per_s"] / result["generate_tokens_per_s"]
    emit(result)


# ------------------------------------------------------------------------------ orchestrator
def _child(args, role: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--role", role, "--workdir", args.workdir]
    for name in ("workload", "device", "prompts", "num_generations", "max_new_tokens", "max_prompt_length", "temperature", "beta",
                 "lr", "steps", "warmup", "rounds", "gen_repeats", "threads", "seed", "compile", "gradient_checkpointing",
                 "memory_cap_gib", "engine"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.vocab:
        argv += ["--vocab", str(args.vocab)]
    flags = (("--force-length", args.force_length), ("--trl-compile", args.trl_compile),
             ("--trl-continuous-batching", args.trl_continuous_batching))
    argv += [flag for flag, on in flags if on]
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
    if proc.returncode not in (0, OUT_OF_MEMORY_EXIT) or not lines:
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


def _run_pairs(args, systems: list[str], label: str = "") -> dict[str, list[dict]]:
    """``args.rounds`` interleaved runs of each system (ours TRL, TRL ours, ...)."""
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for round_index in range(args.rounds):
        order = systems if round_index % 2 == 0 else systems[::-1]
        for system in order:
            run = _child(args, system)
            runs[system].append(run)
            head = f"{label}round {round_index + 1}/{args.rounds} {system:4s}: "
            if run.get("out_of_memory"):
                print(head + f"out of memory at {run['cap_gib']:.0f} GiB (wall {run['wall_s']:.0f} s)", flush=True)
                continue
            rows = args.prompts * args.num_generations
            print(
                head + f"{run['s_per_step']:.3f} s/step, {run['completion_tokens_per_s']:,.1f} completion tokens/s, "
                f"{run['cpu_s_per_step']:.3f} CPU-s/step, peak RSS {run['peak_rss_mib']:,.0f} MiB, "
                f"mean completion {run['completion_tokens_per_step'] / rows:.1f} tokens (wall {run['wall_s']:.0f} s)",
                flush=True,
            )
            print("    phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in run["phases_s"].items()), flush=True)
            print("    phases (CPU-s): " + ", ".join(f"{k} {v:.2f}" for k, v in run["phases_cpu_s"].items()), flush=True)
    return runs


def _summarise(args, systems: list[str], runs: dict[str, list[dict]]) -> dict:
    result = {system: report.aggregate(runs[system]) for system in systems}
    if len(systems) == 2:
        result["ratios"] = report.ratios(result["ours"], result["trl"], runs["ours"], runs["trl"])
    return result


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
        if args.lengths is not None:
            args.max_new_tokens = max(args.length_list)  # prompts are checked against the longest
        assets = _child(args, "build")
        print(
            f"model: {assets['parameters']:,} parameters, vocabulary {assets['vocab_size']:,}; {assets['prompts']} prompts "
            f"(mean {assets['mean_prompt_tokens']:.1f} tokens)", flush=True,
        )
        result = {"config": {k: v for k, v in vars(args).items() if k not in ("role", "workdir")}, "machine": _machine(args)}
        result["config"].update(parameters=assets["parameters"], vocab_size=assets["vocab_size"],
                                mean_prompt_tokens=assets["mean_prompt_tokens"])
        if args.lengths is not None:
            return _sweep(args, systems, result)
        runs = _run_pairs(args, systems)
        result.update(_summarise(args, systems, runs))
        tiny = args.workload == "tiny"
        result["generation"] = None if args.no_generation or not tiny else _child(args, "generation")
        if len(systems) == 2 and result["ratios"]:
            ratio = result["ratios"]
            result["targets"] = {
                "completion_tokens_per_s_ratio_min": 2.0,
                "completion_tokens_per_s_met": ratio["completion_tokens_per_s"] >= 2.0,
                "peak_rss_ratio_max": 0.5 if tiny else 0.6,
                "peak_rss_met": ratio["peak_rss_mib"] <= (0.5 if tiny else 0.6),
            }
            print()
            print(report.table(result))
        print(json.dumps(result))
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _sweep(args, systems: list[str], result: dict) -> dict:
    """Every length of ``--lengths``, forced to full length, each with its own interleaved pairs; a table and a plot."""
    args.force_length, sweep = True, []
    for length in args.length_list:
        args.max_new_tokens = length
        runs = _run_pairs(args, systems, label=f"length {length}: ")
        sweep.append({"length": length, **_summarise(args, systems, runs)})
    result["lengths"] = sweep
    if len(systems) == 2:
        model = "smollm2" if args.workload == "real" else f"tiny{args.vocab or ''}"
        plot = args.plot or str(Path(__file__).resolve().parent / f"lengths_{model}.png")
        title = f"{result['config']['parameters'] / 1e6:.1f}M parameters, vocabulary {result['config']['vocab_size']:,}, " \
                f"{args.prompts} prompts x G={args.num_generations}, 1 thread"
        report.plot_lengths(sweep, title, plot)
        result["plot"] = plot
        print()
        print(report.lengths_table(sweep))
        for point in sweep:
            print(f"\nlength {point['length']}:")
            print(report.phase_table(point))
        print(f"\nplot: {plot}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    arguments = parse_args()
    roles = {"build": build_assets, "ours": run_ours, "trl": run_trl, "generation": run_generation}
    if arguments.role == "main":
        main(arguments)
    else:
        roles[arguments.role](arguments)
