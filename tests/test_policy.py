"""Model and tokenizer loading (`r1_lightning.policy`): built-in model, saved directories, fallbacks, LoRA, log-probs."""

from __future__ import annotations

import copy
import json
import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from r1_lightning.errors import ConfigError
from r1_lightning.export import export_hf_model
from r1_lightning.policy import (
    THINK_TOKENS,
    LoraSettings,
    encode_prompt,
    load_model,
    load_tokenizer,
    render_prompt,
    token_logprobs,
)


def _inputs(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and position ids of ``texts``."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


# --- tokenizer ------------------------------------------------------------------------------------


def test_builtin_tokenizer_round_trips_through_a_saved_directory(builtin_tokenizer, tiny_model_dir, tokenizer_texts):
    reloaded = AutoTokenizer.from_pretrained(tiny_model_dir)  # a qwen2 directory: transformers picks Qwen2Tokenizer
    via_package = load_tokenizer(str(tiny_model_dir))
    assert len(reloaded) == len(builtin_tokenizer) == len(via_package)
    assert reloaded.get_vocab() == builtin_tokenizer.get_vocab()
    for text in tokenizer_texts:
        ids = builtin_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert builtin_tokenizer.decode(ids) == text
        for other in (reloaded, via_package):
            assert other(text, add_special_tokens=False)["input_ids"] == ids, (type(other).__name__, text)
            assert other.decode(ids) == text
    # The R1 tags are single tokens, so rewards and masks can see them.
    for tag in THINK_TOKENS:
        assert len(builtin_tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    assert (reloaded.eos_token, reloaded.pad_token) == (builtin_tokenizer.eos_token, builtin_tokenizer.pad_token)
    assert reloaded.chat_template == builtin_tokenizer.chat_template


def _tokenizer_dir(tmp_path, tiny_model_dir, tokenizer) -> str:
    """A model directory (the tiny model's config.json) holding ``tokenizer``."""
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    return str(tmp_path)


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, builtin_tokenizer, tiny_model_dir, tokenizer_texts):
    no_pad = copy.deepcopy(builtin_tokenizer)
    no_pad.pad_token = None
    path = _tokenizer_dir(tmp_path, tiny_model_dir, no_pad)
    assert AutoTokenizer.from_pretrained(path).pad_token_id is None  # the fallback is really exercised
    saved = (tmp_path / "tokenizer_config.json").read_text()

    tokenizer = load_tokenizer(path)

    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    assert len(tokenizer) == len(builtin_tokenizer)  # no token added for padding
    assert [tokenizer(t)["input_ids"] for t in tokenizer_texts] == [builtin_tokenizer(t)["input_ids"] for t in tokenizer_texts]
    assert (tmp_path / "tokenizer_config.json").read_text() == saved  # the user's files are never changed


def test_tokenizer_without_pad_and_eos_is_a_config_error(tmp_path, builtin_tokenizer, tiny_model_dir):
    bare = copy.deepcopy(builtin_tokenizer)
    bare.pad_token = None
    bare.eos_token = None
    path = _tokenizer_dir(tmp_path, tiny_model_dir, bare)
    with pytest.raises(ConfigError, match="model_name_or_path=.*neither a pad nor an EOS"):
        load_tokenizer(path)


def test_render_prompt_without_chat_template(builtin_tokenizer):
    plain = copy.deepcopy(builtin_tokenizer)
    plain.chat_template = None
    assert render_prompt(plain, "Compute 1+2.") == "Compute 1+2."  # a base model continues the string as is
    messages = [
        {"role": "user", "content": "Compute 1+2."}, {"role": "assistant", "content": "3"}, {"role": "user", "content": "Sure?"}
    ]
    assert render_prompt(plain, messages) == "user: Compute 1+2.\nassistant: 3\nuser: Sure?\nassistant: "
    assert render_prompt(plain, "Compute 1+2.", system_prompt="Think first.") == (
        "system: Think first.\nuser: Compute 1+2.\nassistant: "
    )
    # Plain text gets the tokenizer's own special tokens (none here); the ids decode back to the text.
    assert plain.decode(encode_prompt(plain, "Compute 1+2.")) == "Compute 1+2."


def test_render_prompt_with_chatml_template(builtin_tokenizer):
    assert render_prompt(builtin_tokenizer, "Compute 1+2.") == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "1+1?"}]
    assert render_prompt(builtin_tokenizer, messages, system_prompt="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    # A conversation that brings its own system message keeps it; system_prompt does not add a second one.
    own = [{"role": "system", "content": "Own."}, {"role": "user", "content": "hi"}]
    rendered = render_prompt(builtin_tokenizer, own, system_prompt="Be brief.")
    assert rendered.count("<|im_start|>system") == 1 and "Own." in rendered and "Be brief." not in rendered
    # The template already carries the special tokens: encoding adds none on top.
    ids = encode_prompt(builtin_tokenizer, rendered)
    assert builtin_tokenizer.decode(ids) == rendered
    assert ids.count(builtin_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


# --- model loading --------------------------------------------------------------------------------


def test_load_saved_directory_offline_matches_builtin(tiny_model_dir, builtin_tokenizer):
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    saved = load_model(str(tiny_model_dir)).eval()
    built = load_model("builtin:tiny", vocab_size=len(builtin_tokenizer)).eval()
    assert saved.config.model_type == "qwen2"
    batch = _inputs(builtin_tokenizer, ["Compute 12+7.", "<think>\n</think>"])
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).logits, built(**batch).logits)


def test_builtin_model_is_deterministic_per_seed(builtin_tokenizer):
    a, b, c = (load_model("builtin:tiny-small", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.vocab_size == len(builtin_tokenizer)


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_missing_model_directory_names_the_option(tmp_path, loader):
    with pytest.raises(ConfigError, match=r"model_name_or_path=.*nope.*no such directory"):
        loader(str(tmp_path / "nope"))


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_directory_without_config_json_is_a_config_error(tmp_path, builtin_tokenizer, loader):
    builtin_tokenizer.save_pretrained(tmp_path)  # tokenizer files but no model config
    with pytest.raises(ConfigError, match=r"model_name_or_path=.*no config\.json"):
        loader(str(tmp_path))


def test_unknown_builtin_model_lists_the_builtins():
    with pytest.raises(ConfigError, match="builtin:tiny.*builtin:tiny-small"):
        load_model("builtin:huge")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_option(tiny_model_dir, dtype):
    for source in (str(tiny_model_dir), "builtin:tiny-small"):
        model = load_model(source, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}, source


def test_dtype_auto_keeps_the_saved_dtype_and_bad_dtype_is_an_error(tmp_path, tiny_model_dir):
    load_model(str(tiny_model_dir), dtype="bfloat16").save_pretrained(tmp_path)
    assert {p.dtype for p in load_model(str(tmp_path), dtype="auto").parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="dtype='int3'.*float32"):
        load_model(str(tiny_model_dir), dtype="int3")


def _is_checkpointing(model) -> bool:
    # transformers 5 renamed the flag (the old name warns); keep working on 4.x.
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name))


def test_gradient_checkpointing_flag_keeps_gradients(builtin_tokenizer):
    plain = load_model("builtin:tiny-small")
    checkpointed = load_model("builtin:tiny-small", gradient_checkpointing=True)
    assert _is_checkpointing(checkpointed) and not _is_checkpointing(plain)
    assert checkpointed.config.use_cache is False
    batch = _inputs(builtin_tokenizer, ["Compute 3+4.", "<think>\n3+4=7\n</think>"])
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(**batch).logits.logsumexp(-1).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_lora_trains_only_the_adapter_and_export_merges_it(tmp_path, builtin_tokenizer):
    model = load_model("builtin:tiny-small", lora=LoraSettings(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = [p for n, p in model.named_parameters() if n not in trainable]
    assert frozen and not any(p.requires_grad for p in frozen)
    # The adapter starts as a no-op (B = 0); give it a real update so that merging matters.
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if ".lora_B." in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(i))
    batch = _inputs(builtin_tokenizer, ["Compute 5-3.", "<answer>\n2\n</answer>"])
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        base = load_model("builtin:tiny-small").eval()(**batch).logits
    assert not torch.allclose(adapted, base, atol=1e-4)

    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    target = export_hf_model(trainer, model, builtin_tokenizer)

    weights = load_file(target / "model.safetensors")
    assert not any("lora" in k or "base_model" in k for k in weights)  # a plain Qwen2 checkpoint
    exported = load_model(str(target)).eval()
    assert type(exported).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, adapted, atol=1e-5, rtol=1e-5)
    assert json.loads((target / "config.json").read_text())["model_type"] == "qwen2"
    # the live model keeps training its adapter after the export
    assert any(".lora_A." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, adapted)


# --- log-probs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("lora", [False, True])
def test_token_logprobs_equal_naive_log_softmax(builtin_tokenizer, temperature, lora):
    model = load_model("builtin:tiny-small", lora=LoraSettings(r=4) if lora else None)
    texts = ["Compute 47+385.<think>\n7+5+0=12\n</think>", "Compute 1-1.<answer>\n0\n</answer>", "x"]
    batch = _inputs(builtin_tokenizer, texts)
    # Targets: every real token from the 4th on (a stand-in for completion tokens), never padding.
    target_mask = batch["attention_mask"].bool() & (torch.arange(batch["input_ids"].shape[1]) >= 3)

    logprobs, entropy = token_logprobs(
        model, **batch, target_mask=target_mask, temperature=temperature, chunk_size=5, return_entropy=True
    )
    logprobs.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    logits = model(**batch).logits.float() / temperature  # [B, T, V], the naive reference
    naive = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)  # [B, T-1]
    targets = target_mask[:, 1:]
    expected = torch.zeros_like(logprobs)
    expected[:, 1:] = torch.where(targets, naive, 0.0)
    expected.sum().backward()

    torch.testing.assert_close(logprobs, expected.detach(), atol=1e-5, rtol=1e-5)
    assert (logprobs[~target_mask] == 0).all() and (logprobs[target_mask] < 0).all()
    probs = torch.softmax(logits[:, :-1].detach(), dim=-1)
    naive_entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(entropy[:, 1:][targets], naive_entropy[targets], atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_lora_settings_given_as_a_dict_as_the_cli_saves_them():
    # `--model.init_args.lora '{r: 4}'` reaches configure_model as a dict in the saved hyper-parameters.
    model = load_model("builtin:tiny-small", lora={"r": 4, "alpha": 8})
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)
