"""`RewardModel`: a tiny randomly initialised one-label Qwen2 classifier, built and saved by the test."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from r1_lightning.errors import ConfigError
from r1_lightning.policy import load_tokenizer
from r1_lightning.rewards import RewardModel, RewardSet


def save_classifier(path, num_labels: int = 1):
    tokenizer = load_tokenizer("builtin:tiny")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward_model")
    model, tokenizer = save_classifier(path)
    return path, model, tokenizer


def test_scores_are_the_classifier_logit_of_prompt_and_completion(classifier):
    path, model, tokenizer = classifier
    prompts = ["1+1?", "1+1?", [{"role": "user", "content": "say hi"}], [{"role": "user", "content": "say hi"}], "x"]
    completions = ["2", "<think>one plus one</think> 2", "hi", "", "a much longer completion than the others"]
    reward = RewardModel(str(path), batch_size=2)  # 3 padded batches of lengths 2, 2, 1
    scores = reward(completions, prompts=prompts)
    assert reward.model is not None and not any(p.requires_grad for p in reward.model.parameters())
    # Each pair scored alone (no padding) through the chat template: the same logit.
    for prompt, completion, score in zip(prompts, completions, scores):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        assert completion in text
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = model(**ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == len(scores)  # different texts, different scores: the completion is read


def test_reward_model_in_a_reward_set_and_errors(classifier, tmp_path):
    path, _, _ = classifier
    reward_set = RewardSet([RewardModel(str(path), name="rm")], on_error="raise")
    out = reward_set(["a", "b"], prompts=["p", "p"])
    assert list(out.scores) == ["rm"] and torch.isfinite(out.total).all()
    save_classifier(tmp_path / "two", num_labels=2)
    with pytest.raises(ConfigError, match="one output label, this one has 2"):
        RewardModel(str(tmp_path / "two"))(["a"], prompts=["p"])
    with pytest.raises(ConfigError, match="RewardModel.model_name_or_path"):
        RewardModel(str(tmp_path / "missing"))(["a"], prompts=["p"])
