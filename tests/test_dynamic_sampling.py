"""DAPO dynamic sampling with re-drawing (`r1_lightning.dynamic_sampling`): the group bookkeeping by hand,
the draw loop with scripted draws, and a GRPO run that refills a batch with a flat group."""

from __future__ import annotations

import math

import torch

from grpo_helpers import RolloutRecorder, TextHash, fit, logged_metrics, prompt_data, tiny_grpo
from resume_helpers import _assert_same_run, _fit_with_interruptions
from r1_lightning.dynamic_sampling import concat_rollouts, refill_informative_groups, select_groups
from test_components import PAD, rollout, sampled

def test_concat_rollouts_repads_and_select_groups_keeps_rows_in_order():
    # A: 2 rows, prompt 1 / completion 3 tokens; B: 2 rows, prompt 2 / completion 1. Prompts pad on the left,
    # completions on the right (ids PAD, masks 0, log-probs 0).
    merged = concat_rollouts([rollout(1, 3, 2, 1), rollout(2, 1, 2, 5)], PAD)
    assert merged.prompt_ids.tolist() == [[0, 1], [0, 2], [5, 5], [6, 6]]
    assert merged.prompt_mask.tolist() == [[0, 1], [0, 1], [1, 1], [1, 1]]
    assert merged.completion_ids.tolist() == [[1, 1, 1], [2, 2, 2], [5, 0, 0], [6, 0, 0]]
    assert merged.completion_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert merged.logprobs[2].tolist() == [-1.0, 0.0, 0.0]
    # Groups of 2 rows: [group 1, group 0] = rows [2, 3, 0, 1], and the prompts' lists follow.
    part = sampled([0.0, 1.0, 5.0, 6.0], first_index=0)
    picked = select_groups(part, [1, 0], 2)
    assert picked.rollout.prompt_ids[:, 0].tolist() == [3, 4, 1, 2]
    assert picked.texts == ["0:2", "0:3", "0:0", "0:1"] and picked.scores.total.tolist() == [5.0, 6.0, 0.0, 1.0]
    assert picked.batch["indices"] == [1, 0] and picked.batch["columns"] == {"answer": [1, 0]}


def test_refill_draws_until_the_batch_is_informative():
    # B = 2 groups of G = 2. The loader's batch: [flat, informative]. Draw 1: [flat, flat]. Draw 2: [informative, flat].
    first = sampled([1.0, 1.0, 0.0, 1.0], first_index=0)
    draws = {1: sampled([0.0, 0.0, 2.0, 2.0], 10), 2: sampled([0.5, 0.0, 3.0, 3.0], 20, prompt_len=2, completion_len=2)}
    calls = []

    def draw(k):
        calls.append(k)
        return draws[k]

    out, count = refill_informative_groups(first, draw, lambda s: s.total, 2, max_draws=5, pad_token_id=PAD)
    assert count == 2 and calls == [1, 2]  # stops as soon as 2 informative groups are held
    assert out.batch["indices"] == [1, 20]  # the informative groups, in draw order
    assert out.scores.total.tolist() == [0.0, 1.0, 0.5, 0.0]
    assert out.rollout.completion_ids.shape == (4, 2)  # re-padded to the longest draw
    # Out of draws: the informative group first, then the first flat one (the loss mask drops it).
    out, count = refill_informative_groups(first, draw, lambda s: s.total, 2, max_draws=1, pad_token_id=PAD)
    assert count == 1 and out.batch["indices"] == [1, 0]
    # Already informative: no draw at all.
    out, count = refill_informative_groups(sampled([0.0, 1.0, 1.0, 0.0], 0), draw, lambda s: s.total, 2, 5, PAD)
    assert count == 0 and out.batch["indices"] == [0, 1]


def test_draw_prompts_is_seeded_and_ranks_draw_different_prompts():
    data = prompt_data()
    module = tiny_grpo()
    data.tokenizer = module.tokenizer
    data.setup("fit")
    draw = lambda rank: data.draw_prompts(3, torch.Generator().manual_seed(7), rank, 2)["indices"]  # noqa: E731
    assert draw(0) == draw(0)  # a pure function of the seed: a resumed run draws the same prompts
    assert len(set(draw(0)) | set(draw(1))) == 6  # 2 ranks x 3 distinct prompts of the 8


def half_flat(completions, *, prompts, **columns):
    """The first prompt of every reward call (loader batch or draw) gets a flat group; the others vary (TextHash)."""
    first = prompts[0]
    return [1.0 if p == first else TextHash()([c], prompts=[p])[0] for c, p in zip(completions, prompts)]


def test_grpo_refills_a_flat_group(tmp_path):
    rollouts = RolloutRecorder()
    module = tiny_grpo(rewards=[half_flat], dynamic_sampling=True, dynamic_sampling_max_draws=3)
    trainer = fit(module, prompt_data(), tmp_path, callbacks=[rollouts])
    logged = logged_metrics(trainer)
    # One extra draw brings a second informative group: the batch is full of signal.
    assert logged["train/dynamic_sampling_draws"] == [1.0]
    assert logged["train/kept_frac"] == [1.0] and logged["train/zero_std_frac"] == [0.0]
    (record,) = rollouts.batches
    assert record.rewards.shape == (8,) and len(record.texts) == 8  # still B = 2 prompts x G = 4
    assert not math.isnan(record.advantages.abs().sum().item()) and (record.advantages != 0).any()


def test_refilled_run_resumes_exactly(tmp_path):
    # The draws depend only on (seed, rollout step, draw): a run stopped after step 1 and resumed from its
    # checkpoint draws, samples and trains exactly as the uninterrupted one.
    def make():
        module = tiny_grpo(rewards=[half_flat], dynamic_sampling=True, dynamic_sampling_max_draws=2, learning_rate=1e-3)
        return module, prompt_data()

    uninterrupted, a = _fit_with_interruptions(make, tmp_path / "a", 3, [])
    resumed, b = _fit_with_interruptions(make, tmp_path / "b", 3, [1])
    assert len(resumed) == 3
    _assert_same_run(resumed, uninterrupted)
    for name, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
