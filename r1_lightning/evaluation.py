"""Generation-based evaluation shared by every module: sample k completions per prompt and score them."""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch

from r1_lightning.engines import RolloutEngine, SamplingParams
from r1_lightning.metrics import merge_equal_answers
from r1_lightning.rewards import Accuracy, FailedScore, LenientFormat
from r1_lightning.rewards.parsing import extract_answer, extract_reasoning, restore_think_prefill
from r1_lightning.rl.groups import group_of, repeat_per_completion, split_groups


@dataclass
class Scored:
    """Per prompt, per sample: the completion text, its normalised answer, correctness and format.

    Answers that math-verify finds equal within a prompt (``0.5``, ``1/2``, ``\\frac{1}{2}``) carry one
    string (the first seen), so a majority vote counts them together.
    """

    texts: list[list[str]]
    answers: list[list[str | None]]
    correct: list[list[float | None]]
    formatted: list[list[float]]
    reasoning_lengths: list[list[int]]


def raw_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    """The generated text of each row, special tokens dropped."""
    return tokenizer.batch_decode([ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)], skip_special_tokens=True)


def scored_texts(prompt_texts: list[str], completions: list[str], num_generations: int) -> list[str]:
    """Completions as rewards see them: a ``<think>`` opened by the chat template put back (see ``restore_think_prefill``)."""
    return [restore_think_prefill(prompt_texts[group_of(i, num_generations)], text) for i, text in enumerate(completions)]


def decode_completions(tokenizer, prompt_ids: list[list[int]], completion_ids: torch.Tensor, completion_mask: torch.Tensor, num_generations: int) -> list[str]:
    """``scored_texts`` from token ids (the prompts are decoded to find a template's ``<think>``)."""
    prompt_texts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=False)
    return scored_texts(prompt_texts, raw_completions(tokenizer, completion_ids, completion_mask), num_generations)


def generate_and_score(
    model: torch.nn.Module,
    tokenizer,
    engine: RolloutEngine,
    prompt_ids: list[list[int]],
    references: list[str],
    params: SamplingParams,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Scored:
    """Sample ``num_samples`` completions per prompt and score answer correctness and format."""
    rollout = engine.generate(model, prompt_ids, num_samples, params, generator)
    texts = decode_completions(tokenizer, prompt_ids, rollout.completion_ids, rollout.completion_mask, num_samples)
    repeated = repeat_per_completion(references, num_samples)
    prompts = repeat_per_completion(prompt_ids, num_samples)
    # None (reference not parsable) stays None: the metrics leave such prompts out rather than count a 0.
    # An answer math-verify could not check in time (a FailedScore) is not credited.
    scores = _accuracy()(texts, prompts=prompts, answer=repeated)
    correct = [None if c is None else 0.0 if isinstance(c, FailedScore) else float(c) for c in scores]
    formatted = [float(f) for f in LenientFormat()(texts, prompts=prompts)]
    answers = [_normalise(extract_answer(t)) for t in texts]
    answers = [a for group in group_equal_answers(answers, num_samples) for a in group]
    reasoning = [extract_reasoning(t) or "" for t in texts]
    reasoning_lengths = [len(ids) for ids in tokenizer(reasoning, add_special_tokens=False)["input_ids"]]
    columns = (texts, answers, correct, formatted, reasoning_lengths)
    return Scored(*(split_groups(values, num_samples) for values in columns))


def group_equal_answers(answers: list[str | None], num_samples: int) -> list[list[str | None]]:
    """Each prompt's answers with math-verify-equal ones merged (``merge_equal_answers``); one worker-pool call for all pairs."""
    groups = [answers[i : i + num_samples] for i in range(0, len(answers), num_samples)]
    pairs = [
        (g, i, j) for g, group in enumerate(groups) for j in range(len(group)) for i in range(j)
        if group[i] is not None and group[j] is not None and group[i] != group[j]
    ]
    verdicts = _accuracy().equal_answers([(groups[g][i], groups[g][j]) for g, i, j in pairs])
    equal = {pair for pair, same in zip(pairs, verdicts) if same}
    return [merge_equal_answers(group, lambda i, j, g=g: (g, i, j) in equal) for g, group in enumerate(groups)]


@functools.cache
def _accuracy() -> Accuracy:
    # One per process: its math-verify worker processes then start once, not at every validation batch.
    return Accuracy()


def _normalise(answer: str | None) -> str | None:
    if answer is None:
        return None
    answer = " ".join(answer.split())
    return answer or None
