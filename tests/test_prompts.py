"""Tests for `PromptDataModule`: files with extra columns, chat prompts, length limits, the built-in task,
and how prompts reach the rewards during a GRPO step (whole groups, columns unchanged, per rank)."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from grpo_helpers import RecordingReward, RolloutRecorder, TextHash, fit, tiny_grpo, write_jsonl
from r1_lightning import PromptDataModule
from r1_lightning.data.prompts import collate_prompts
from r1_lightning.errors import UserError
from r1_lightning.policy import build_builtin_tokenizer

G = 4  # completions per prompt in the GRPO runs below

# Extra columns of several types; `answer` is what Accuracy reads, the others are arbitrary.
ROWS = [
    {"prompt": "Compute 1+2.", "answer": "3", "difficulty": 1, "tags": ["add"]},
    {"prompt": "Compute 9-4.", "answer": "5", "difficulty": 2, "tags": ["sub", "small"]},
    {"prompt": "Compute 12+30.", "answer": "42", "difficulty": 3, "tags": []},
    {"prompt": "Compute 50-8.", "answer": "42", "difficulty": 4, "tags": ["sub"]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer()


def data(path=None, **overrides) -> PromptDataModule:
    return PromptDataModule(**{"path": None if path is None else str(path), "max_prompt_length": 64, "tokenizer": build_builtin_tokenizer(), **overrides})


def assert_whole_groups(values: list, num_generations: int) -> None:
    """`values` is blocks of `num_generations` equal, consecutive entries (one block per prompt)."""
    assert len(values) % num_generations == 0
    for start in range(0, len(values), num_generations):
        assert all(v == values[start] for v in values[start : start + num_generations]), values


# ------------------------------------------------------------------------------------ reading files
def test_jsonl_prompts_keep_every_other_column(tmp_path):
    dm = data(write_jsonl(tmp_path / "prompts.jsonl", ROWS))
    dm.setup("fit")
    examples = dm.examples["train"]
    assert [e["prompt"] for e in examples] == [r["prompt"] for r in ROWS]
    assert [e["columns"] for e in examples] == [{k: v for k, v in r.items() if k != "prompt"} for r in ROWS]
    assert all(type(e["columns"]["difficulty"]) is int for e in examples)
    # A path without val_path: no validation prompts (the built-in held-out set would not fit the data).
    assert dm.examples["val"] == [] and dm.val_dataloader() == []


def test_collate_keeps_python_values_and_prompt_order(tmp_path):
    dm = data(write_jsonl(tmp_path / "prompts.jsonl", ROWS), batch_size=3, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompts"] == [r["prompt"] for r in ROWS[:3]]  # batch_size counts prompts
    assert batch["columns"] == {name: [r[name] for r in ROWS[:3]] for name in ("answer", "difficulty", "tags")}
    assert [len(ids) for ids in batch["prompt_ids"]] == [len(e["prompt_ids"]) for e in dm.examples["train"][:3]]


def test_prompt_column_option_and_missing_column_error(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["answer"]} for r in ROWS]
    dm = data(write_jsonl(tmp_path / "q.jsonl", rows), prompt_column="question")
    dm.setup("fit")
    assert [e["prompt"] for e in dm.examples["train"]] == [r["question"] for r in rows]
    assert all(e["columns"] == {"answer": r["answer"]} for e, r in zip(dm.examples["train"], rows))

    with pytest.raises(UserError, match=r"q\.jsonl.*'prompt'.*question"):  # names the file, the column, what exists
        data(tmp_path / "q.jsonl").setup("fit")


def test_chat_message_prompts_render_with_the_template(tmp_path, tokenizer):
    messages = [
        [{"role": "user", "content": "Compute 1+2."}],
        [{"role": "system", "content": "Think first."}, {"role": "user", "content": "Compute 9-4."}],
    ]
    dm = data(write_jsonl(tmp_path / "chat.jsonl", [{"prompt": m, "answer": a} for m, a in zip(messages, ["3", "5"])]))
    dm.setup("fit")
    for example, message in zip(dm.examples["train"], messages):
        assert example["prompt"] == message  # the rewards get the messages as written
        expected = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
        assert example["prompt_text"] == expected
        assert example["prompt_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert dm.examples["train"][1]["prompt_text"].startswith("<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\n")


def test_system_prompt_is_added_once(tmp_path):
    rows = [
        {"prompt": "Compute 1+2.", "answer": "3"},
        {"prompt": [{"role": "user", "content": "Compute 9-4."}], "answer": "5"},
    ]
    strings = data(write_jsonl(tmp_path / "s.jsonl", rows[:1]), system_prompt="Reason step by step.")
    chats = data(write_jsonl(tmp_path / "c.jsonl", rows[1:]), system_prompt="Reason step by step.")
    strings.setup("fit")
    chats.setup("fit")
    for dm, user in ((strings, "Compute 1+2."), (chats, "Compute 9-4.")):
        text = dm.examples["train"][0]["prompt_text"]
        assert text == (
            "<|im_start|>system\nReason step by step.<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )

    # A prompt that brings its own system message keeps it and gets no second one.
    own = [{"prompt": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi."}], "answer": "1"}]
    dm = data(write_jsonl(tmp_path / "own.jsonl", own), system_prompt="Reason step by step.")
    dm.setup("fit")
    text = dm.examples["train"][0]["prompt_text"]
    assert text.count("<|im_start|>system") == 1 and "Mine." in text and "Reason step by step." not in text


# ------------------------------------------------------------------------------------ prompt length
def long_rows() -> list[dict]:
    return [ROWS[0], ROWS[1], {"prompt": "Compute " + "1+" * 60 + "1.", "answer": "61"}, ROWS[2]]


def test_overlong_prompt_error_names_the_row_and_the_limit(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", long_rows())
    with pytest.raises(UserError) as error:
        data(path).setup("fit")
    message = str(error.value)
    assert "long.jsonl:3:" in message and "max_prompt_length=64" in message  # the third row is on line 3
    assert "overlong" in message  # says how to get past it


def test_overlong_drop_keeps_the_rest_and_warns(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", long_rows())
    dm = data(path, overlong="drop")
    with pytest.warns(UserWarning, match="dropped 1 prompts"):
        dm.setup("fit")
    assert [e["prompt"] for e in dm.examples["train"]] == [ROWS[0]["prompt"], ROWS[1]["prompt"], ROWS[2]["prompt"]]
    assert all(len(e["prompt_ids"]) <= 64 for e in dm.examples["train"])


def test_overlong_drop_of_every_prompt_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", long_rows())
    with pytest.raises(UserError, match="no prompts left"):
        data(path, overlong="drop", max_prompt_length=4).setup("fit")


@pytest.mark.parametrize("option", [{"overlong": "truncate"}, {"batch_size": 0}])
def test_bad_options_are_rejected_by_name(option):
    name = next(iter(option))
    with pytest.raises(UserError, match=name):
        PromptDataModule(**option)


# ------------------------------------------------------------------------------------ built-in task
def test_builtin_task_without_a_path(tokenizer):
    dm = data(num_samples=12, num_val_samples=5)
    dm.setup("fit")
    train, val = dm.examples["train"], dm.examples["val"]
    assert len(train) == 12 and len(val) == 5
    for example in train + val:
        assert set(example["columns"]) == {"answer"}
        expression = example["prompt"].removeprefix("Compute ").removesuffix(".")
        assert example["columns"]["answer"] == str(eval(expression))  # a correct reference answer
        assert example["prompt_ids"] == tokenizer(example["prompt_text"], add_special_tokens=False)["input_ids"]
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in val}  # held-out prompts never trained on
    assert len(dm.val_dataloader()) == 1 + (5 - 1) // dm.hparams.batch_size


# ------------------------------------------------------------------------------- through GRPO to the rewards
@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """One GRPO step on the JSONL prompts: 2 prompts, G = 4, with a reward that records its inputs."""
    root = tmp_path_factory.mktemp("prompts_run")
    recorder, rollouts = RecordingReward(), RolloutRecorder()
    module = tiny_grpo(rewards=[recorder, TextHash()], num_generations=G)
    dm = PromptDataModule(path=str(write_jsonl(root / "prompts.jsonl", ROWS)), batch_size=2, max_prompt_length=64)
    fit(module, dm, root, max_steps=2, callbacks=[rollouts])
    return recorder.calls, rollouts.batches


def test_batch_size_counts_prompts(recorded_run):
    calls, rollouts = recorded_run
    assert len(calls) == 2  # one reward call per training step
    for call, rollout in zip(calls, rollouts):
        assert len(call["completions"]) == 2 * G  # batch_size=2 prompts x G completions
        assert rollout.rollout.completion_ids.shape[0] == 2 * G
        assert len(set(call["prompts"])) == 2
        assert rollout.num_generations == G


def test_extra_columns_reach_the_rewards_unchanged_in_whole_groups(recorded_run):
    calls, _ = recorded_run
    by_prompt = {r["prompt"]: r for r in ROWS}
    for call in calls:
        n = len(call["completions"])
        assert set(call["columns"]) == {"answer", "difficulty", "tags"}
        for name, values in {"prompts": call["prompts"], **call["columns"]}.items():
            assert len(values) == n, name  # one entry per completion
            assert_whole_groups(values, G)
        for i, prompt in enumerate(call["prompts"]):
            row = by_prompt[prompt]  # each completion's columns are its own prompt's row, values and types unchanged
            for name in ("answer", "difficulty", "tags"):
                assert call["columns"][name][i] == row[name] and type(call["columns"][name][i]) is type(row[name])
    seen = [p for call in calls for p in call["prompts"][::G]]
    assert sorted(seen) == sorted(r["prompt"] for r in ROWS)  # 2 steps x 2 prompts: each prompt once


def test_rewards_see_the_decoded_completions(recorded_run, tokenizer):
    calls, rollouts = recorded_run
    for call, record in zip(calls, rollouts):
        rollout = record.rollout
        decoded = [
            tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)
        ]
        assert call["completions"] == decoded == record.texts


# ------------------------------------------------------------------------------------------- two ranks
class RankData(PromptDataModule):
    """The training loader as Lightning builds it on rank `rank` of 2 (a `DistributedSampler`)."""

    def __init__(self, rank: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rank = rank

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.examples["train"], num_replicas=2, rank=self.rank, shuffle=False)
        return DataLoader(self.examples["train"], batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=collate_prompts)


def test_two_ranks_get_distinct_prompts_and_groups_never_span_ranks(tmp_path):
    dm = data(num_samples=10, batch_size=2)
    dm.setup("fit")
    examples = dm.examples["train"]
    per_rank = [
        [examples[i]["prompt"] for i in DistributedSampler(examples, num_replicas=2, rank=r, shuffle=False)] for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 5
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == {e["prompt"] for e in examples}

    # One GRPO step per rank: every group a reward sees holds one prompt, of that rank's share.
    seen = []
    for rank in (0, 1):
        recorder = RecordingReward()
        module = tiny_grpo(rewards=[recorder], num_generations=2, max_new_tokens=4)
        fit(module, RankData(rank, num_samples=10, batch_size=2, max_prompt_length=64, shuffle=False), tmp_path / f"rank{rank}")
        (call,) = recorder.calls
        assert len(call["completions"]) == 2 * 2
        assert_whole_groups(call["prompts"], 2)
        assert_whole_groups(call["columns"]["answer"], 2)
        assert set(call["prompts"]) <= set(per_rank[rank])
        seen.append(set(call["prompts"]))
    assert not seen[0] & seen[1]


def test_each_rank_samples_with_its_own_seed(monkeypatch):
    """The same prompt on two ranks must not get the same G completions: the sampling seed includes the rank."""
    module = tiny_grpo()
    seeds = []
    for rank in (0, 1):
        monkeypatch.setattr(type(module), "global_rank", property(lambda self, r=rank: r))
        seeds.append(module.seeds.for_batch({}, module.rollout_step, module.global_rank).initial_seed())
    assert seeds[0] != seeds[1]
