"""Data sources, the cold-start data module (overlong policies, masks, packing) and the built-in task."""

from __future__ import annotations

import json
import re
import warnings

import datasets
import pytest

from r1_lightning.data.cold_start import ColdStartDataModule, pack, pad
from r1_lightning.data.sources import DataError, load_rows
from r1_lightning.data.tasks import ArithmeticTask, is_held_out
from r1_lightning.errors import ConfigError
from r1_lightning.policy import encode_prompt, render_prompt

# Strings only, none that CSV would read as a number; commas, quotes, newlines, tabs and non-ASCII
# so that every writer has to quote and escape.
ROWS = [
    {"prompt": "Compute 1+2.", "completion": '<think>\n1+2=3, "easy"\n</think>\n<answer>\n3\n</answer>', "answer": "three", "source": "a"},
    {"prompt": "Größe von 数学?", "completion": "<think>\nhm,\tok\n</think>\n<answer>\nx\n</answer>", "answer": "x", "source": "b"},
    {"prompt": "Say hi, then stop.", "completion": "hi", "answer": "hi", "source": "c"},
]
MESSAGES = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+2."}], "completion": "<answer>4</answer>"},
    {"prompt": [{"role": "user", "content": "Compute 3+3."}], "completion": "<answer>6</answer>"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _jsonl(tmp_path, rows):
    write_jsonl(path := tmp_path / "rows.jsonl", rows)
    return str(path)


def _json_records(tmp_path, rows):
    (path := tmp_path / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _json_columns(tmp_path, rows):
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    (path := tmp_path / "rows.json").write_text(json.dumps(columns), encoding="utf-8")
    return str(path)


def _parquet(tmp_path, rows):
    datasets.Dataset.from_list(rows).to_parquet(path := str(tmp_path / "rows.parquet"))
    return path


def _csv(tmp_path, rows):
    datasets.Dataset.from_list(rows).to_csv(path := str(tmp_path / "rows.csv"))
    return path


def _saved_dataset(tmp_path, rows):
    datasets.Dataset.from_list(rows).save_to_disk(path := str(tmp_path / "saved"))
    return path


def _saved_dataset_dict(tmp_path, rows):
    other = [{**r, "source": "other split"} for r in rows[:1]]
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(other), validation=datasets.Dataset.from_list(rows))
    splits.save_to_disk(path := str(tmp_path / "saved_dict"))
    return path


WRITERS = [_jsonl, _json_records, _json_columns, _parquet, _csv, _saved_dataset, _saved_dataset_dict]


@pytest.mark.parametrize("write", WRITERS, ids=lambda w: w.__name__.strip("_"))
def test_every_source_type_reads_the_same_rows(tmp_path, write):
    path = write(tmp_path, ROWS)
    split = "validation" if write is _saved_dataset_dict else "train"
    assert [dict(r) for r in load_rows(path, split=split)] == ROWS  # extra column `source` included


def test_saved_dataset_dict_missing_split_lists_the_splits(tmp_path):
    path = _saved_dataset_dict(tmp_path, ROWS)
    with pytest.raises(DataError, match=r"no split 'test'; the splits are: train, validation"):
        load_rows(path, split="test")


@pytest.mark.parametrize("write", [_jsonl, _parquet, _saved_dataset], ids=lambda w: w.__name__.strip("_"))
def test_chat_message_prompts(tmp_path, write, builtin_tokenizer):
    path = write(tmp_path, MESSAGES)
    assert [dict(r) for r in load_rows(path)] == MESSAGES
    dm = ColdStartDataModule(path=path, tokenizer=builtin_tokenizer, system_prompt="Think step by step.")
    dm.setup("fit")
    for example, row in zip(dm.train_examples, MESSAGES, strict=True):
        text = builtin_tokenizer.decode(example["prompt_ids"])
        assert text == render_prompt(builtin_tokenizer, row["prompt"], "Think step by step.")
        assert text.endswith("<|im_start|>assistant\n") and row["prompt"][-1]["content"] in text
    # The row's own system message wins over system_prompt; the other row gets system_prompt.
    first, second = (builtin_tokenizer.decode(e["prompt_ids"]) for e in dm.train_examples)
    assert "Be brief." in first and "Think step by step." not in first
    assert second.startswith("<|im_start|>system\nThink step by step.<|im_end|>")
    assert [e["answer"] for e in dm.train_examples] == ["4", "6"]  # from the completion's <answer>


def test_answer_column_and_fallbacks(tmp_path, builtin_tokenizer):
    rows = [
        {"prompt": "p", "completion": "<answer>7</answer>", "answer": 0},  # a real 0, e.g. read from CSV
        {"prompt": "p", "completion": "<answer>7</answer>", "answer": None},  # no reference: the completion's
        {"prompt": "p", "completion": "no tags at all", "answer": None},  # no reference anywhere
    ]
    dm = ColdStartDataModule(path=_jsonl(tmp_path, rows), tokenizer=builtin_tokenizer)
    dm.setup("fit")
    assert [e["answer"] for e in dm.train_examples] == ["0", "7", None]
    assert dm.collate(dm.train_examples)["answers"] == ["0", "7", None]


def test_custom_column_names(tmp_path, builtin_tokenizer):
    rows = [{"question": r["prompt"], "solution": r["completion"], "ref": r["answer"]} for r in ROWS]
    dm = ColdStartDataModule(
        path=_jsonl(tmp_path, rows), prompt_column="question", completion_column="solution", answer_column="ref",
        tokenizer=builtin_tokenizer,
    )
    dm.setup("fit")
    assert [e["answer"] for e in dm.train_examples] == [r["answer"] for r in ROWS]
    eos = [builtin_tokenizer.eos_token_id]
    expected = [builtin_tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + eos for r in ROWS]
    assert [e["completion_ids"] for e in dm.train_examples] == expected


# --- bad input ------------------------------------------------------------------------------------


def test_malformed_jsonl_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": }\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_rows(str(path))
    assert f"{path}:3:31:" in str(error.value)  # blank lines count: line 3, the column of the missing value


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n["a", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2:") + ".*JSON object"):
        load_rows(str(path))


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a",\n   "completion" "b"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:3:17:")):
        load_rows(str(path))


def test_missing_column_lists_the_existing_columns(tmp_path, builtin_tokenizer):
    path = _jsonl(tmp_path, [{"question": "q", "completion": "c", "answer": "a"}])
    dm = ColdStartDataModule(path=path, tokenizer=builtin_tokenizer)
    with pytest.raises(DataError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert path in message and "'prompt'" in message and "the columns are: question, completion, answer" in message


@pytest.mark.parametrize(
    ("suffix", "content"), [(".jsonl", ""), (".jsonl", "\n\n  \n"), (".json", ""), (".csv", ""), (".parquet", "")]
)
def test_empty_file_is_an_error_naming_it(tmp_path, suffix, content):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(repr(str(path))) + ".*empty"):
        load_rows(str(path))


def test_empty_json_list_and_empty_saved_dataset(tmp_path):
    (path := tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(path))
    # datasets itself cannot load an empty saved dataset (IndexError); we still name the directory.
    datasets.Dataset.from_dict({"prompt": [], "completion": []}).save_to_disk(saved := str(tmp_path / "saved"))
    with pytest.raises(DataError, match=re.escape(f"val_path={saved!r}")):
        load_rows(saved, option="val_path")


def test_unknown_extension_and_missing_file(tmp_path):
    (path := tmp_path / "rows.txt").write_text("prompt\n")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'; use one of \.jsonl, \.json, \.parquet, \.csv"):
        load_rows(str(path))
    with pytest.raises(DataError, match=r"val_path=.*missing\.jsonl.*no such file"):
        load_rows(str(tmp_path / "missing.jsonl"), option="val_path")


def test_bad_option_values_are_config_errors():
    with pytest.raises(ConfigError, match="overlong='nope'"):
        ColdStartDataModule(overlong="nope")
    with pytest.raises(ConfigError, match="max_length=1"):
        ColdStartDataModule(max_length=1)


# --- overlong samples -----------------------------------------------------------------------------


def _lengths(tokenizer, row):
    prompt = encode_prompt(tokenizer, render_prompt(tokenizer, row["prompt"]))
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, completion


@pytest.fixture
def mixed_lengths(tmp_path, builtin_tokenizer):
    """Short and long rows (long = 40 more completion tokens) and a max_length between them."""
    short = {"prompt": "Compute 1+2.", "completion": "<answer>3</answer>"}
    long = {"prompt": "Compute 1+2.", "completion": "<think>\n" + "1+2=3\n" * 8 + "</think><answer>3</answer>"}
    rows = [short, long, short, long]
    prompt, completion = _lengths(builtin_tokenizer, long)
    max_length = len(prompt) + len(completion) - 10
    assert sum(map(len, _lengths(builtin_tokenizer, short))) < max_length
    return _jsonl(tmp_path, rows), rows, max_length


def test_overlong_error_names_the_row_and_max_length(mixed_lengths, builtin_tokenizer):
    path, rows, max_length = mixed_lengths
    total = sum(map(len, _lengths(builtin_tokenizer, rows[1])))
    dm = ColdStartDataModule(path=path, max_length=max_length, tokenizer=builtin_tokenizer)
    with pytest.raises(DataError, match=re.escape(f"{path}:2: the sample has {total} tokens > max_length={max_length}")):
        dm.setup("fit")


def test_overlong_drop_counts_per_source(mixed_lengths, tmp_path, builtin_tokenizer):
    path, rows, max_length = mixed_lengths
    (tmp_path / "val").mkdir()
    val_path = _jsonl(tmp_path / "val", rows[:2])
    dm = ColdStartDataModule(path=path, val_path=val_path, max_length=max_length, overlong="drop", tokenizer=builtin_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert len(dm.train_examples) == 2 and len(dm.val_examples) == 1
    assert dm.num_dropped == 3
    messages = [str(w.message) for w in caught if "dropped" in str(w.message)]
    assert messages == [
        f"path={path!r}: dropped 2 samples longer than max_length={max_length}",
        f"val_path={val_path!r}: dropped 1 samples longer than max_length={max_length}",
    ]
    short_ids = sum(_lengths(builtin_tokenizer, rows[0]), [])
    assert all(e["prompt_ids"] + e["completion_ids"] == short_ids for e in dm.train_examples)


def test_overlong_drop_of_every_sample_is_an_error(tmp_path, builtin_tokenizer):
    long = {"prompt": "Compute 1+2.", "completion": "x" * 50}
    dm = ColdStartDataModule(path=_jsonl(tmp_path, [long]), max_length=30, overlong="drop", tokenizer=builtin_tokenizer)
    with pytest.raises(DataError, match="every sample was dropped.*max_length=30"), pytest.warns(UserWarning, match="dropped 1"):
        dm.setup("fit")


def test_overlong_truncate_keeps_the_prompt_and_cuts_the_completion(mixed_lengths, builtin_tokenizer):
    path, rows, max_length = mixed_lengths
    dm = ColdStartDataModule(path=path, max_length=max_length, overlong="truncate", tokenizer=builtin_tokenizer)
    dm.setup("fit")
    assert len(dm.train_examples) == 4 and dm.num_dropped == 0
    for example, row in zip(dm.train_examples, rows):
        prompt, completion = _lengths(builtin_tokenizer, row)
        assert example["prompt_ids"] == prompt
        assert example["completion_ids"] == completion[: max_length - len(prompt)]
        assert len(example["prompt_ids"]) + len(example["completion_ids"]) <= max_length
    assert len(dm.train_examples[1]["prompt_ids"]) + len(dm.train_examples[1]["completion_ids"]) == max_length


def test_overlong_truncate_with_a_prompt_at_max_length_is_an_error(tmp_path, builtin_tokenizer):
    row = {"prompt": "Compute 1+2. " * 5, "completion": "<answer>3</answer>"}
    prompt, _ = _lengths(builtin_tokenizer, row)
    path = _jsonl(tmp_path, [row])
    dm = ColdStartDataModule(path=path, max_length=len(prompt), overlong="truncate", tokenizer=builtin_tokenizer)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: the sample has ") + f".* > max_length={len(prompt)}"):
        dm.setup("fit")


# --- collate: loss mask, padding, packing ---------------------------------------------------------


@pytest.fixture(scope="module")
def task_examples(builtin_tokenizer):
    dm = ColdStartDataModule(num_samples=12, num_val_samples=4, max_length=256, tokenizer=builtin_tokenizer)
    dm.setup("fit")
    return dm.train_examples


def test_pad_collate_masks_completion_tokens_only(task_examples, builtin_tokenizer):
    batch = pad(task_examples, builtin_tokenizer.pad_token_id)
    lengths = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in task_examples]
    assert batch["input_ids"].shape == (len(task_examples), max(lengths))
    assert len(set(lengths)) > 1  # padding is really exercised
    for i, e in enumerate(task_examples):
        p, n = len(e["prompt_ids"]), lengths[i]
        assert batch["input_ids"][i, :n].tolist() == e["prompt_ids"] + e["completion_ids"]
        assert not batch["loss_mask"][i, :p].any()  # no loss on any prompt token
        assert batch["loss_mask"][i, p:n].all()  # loss on every completion token ...
        assert batch["input_ids"][i, n - 1] == builtin_tokenizer.eos_token_id  # ... including the EOS
        assert not batch["loss_mask"][i, n:].any() and not batch["attention_mask"][i, n:].any()
        assert batch["attention_mask"][i, :n].all()
        assert batch["position_ids"][i, :n].tolist() == list(range(n))
    assert batch["loss_mask"].sum() == sum(len(e["completion_ids"]) for e in task_examples)


def test_pack_restarts_positions_per_sample(task_examples, builtin_tokenizer):
    lengths = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in task_examples]
    max_length = 3 * max(lengths)  # several samples per row, several rows
    batch = pack(task_examples, max_length, builtin_tokenizer.pad_token_id)
    assert batch["attention_mask"] is None
    assert 1 < batch["input_ids"].shape[0] < len(task_examples) and batch["input_ids"].shape[1] <= max_length

    # Walk the rows: a sample starts where the position id is 0; read the samples back in order.
    samples = []
    for ids, positions, mask in zip(batch["input_ids"], batch["position_ids"], batch["loss_mask"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        for s, e in zip(starts[:-1], starts[1:]):
            assert positions[s:e].tolist() == list(range(e - s))
            samples.append((ids[s:e].tolist(), mask[s:e].tolist()))
    # Every real sample has a completion (at least its EOS); a segment without loss is row-end padding.
    real = [(ids, mask) for ids, mask in samples if any(mask)]
    padding = [ids for ids, mask in samples if not any(mask)]
    for (ids, mask), example in zip(real, task_examples, strict=True):
        assert ids == example["prompt_ids"] + example["completion_ids"]
        assert mask == [False] * len(example["prompt_ids"]) + [True] * len(example["completion_ids"])
    assert padding and all(set(ids) == {builtin_tokenizer.pad_token_id} for ids in padding)
    assert batch["loss_mask"].sum() == sum(len(e["completion_ids"]) for e in task_examples)


def test_data_module_collate_switches_on_packing(task_examples, builtin_tokenizer):
    padded = ColdStartDataModule(tokenizer=builtin_tokenizer).collate(task_examples)
    packed = ColdStartDataModule(tokenizer=builtin_tokenizer, packing=True, max_length=256).collate(task_examples)
    assert padded["attention_mask"] is not None and packed["attention_mask"] is None
    for batch in (padded, packed):
        assert batch["prompt_ids"] == [e["prompt_ids"] for e in task_examples]
        assert batch["answers"] == [e["answer"] for e in task_examples]


# --- the built-in task ----------------------------------------------------------------------------


def _check_row(row):
    a, op, b = re.fullmatch(r"Compute (\d+)([+-])(\d+)\.", row["prompt"]).groups()
    expected = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert row["answer"] == str(expected) and expected >= 0
    assert row["completion"].startswith("<think>\n") and row["completion"].endswith(f"</think>\n<answer>\n{expected}\n</answer>")
    return int(a), op, int(b)


def test_builtin_task_is_deterministic_and_seeded():
    task = ArithmeticTask()
    assert task.rows("sft", 50) == ArithmeticTask().rows("sft", 50)
    assert task.rows("sft", 20) == task.rows("sft", 50)[:20]  # a prefix: more samples extend the set
    assert task.rows("sft", 50) != ArithmeticTask(seed=1).rows("sft", 50)
    assert task.rows("sft", 50) != task.rows("rl", 50)


def test_builtin_task_eval_never_overlaps_training_and_answers_are_right():
    task = ArithmeticTask()
    splits = {split: task.rows(split, n) for split, n in (("sft", 3000), ("rl", 3000), ("eval", 600))}
    problems = {split: [_check_row(r) for r in rows] for split, rows in splits.items()}
    for split, items in problems.items():
        assert len(set(items)) == len(items), f"{split} repeats a problem"
        assert all(is_held_out(*p) == (split == "eval") for p in items)
    evaluation = {r["prompt"] for r in splits["eval"]}
    assert not evaluation & {r["prompt"] for r in splits["sft"]}
    assert not evaluation & {r["prompt"] for r in splits["rl"]}
    assert {op for _, op, _ in problems["sft"]} == {"+", "-"}


def test_builtin_task_digits_and_worked_solution():
    task = ArithmeticTask(min_digits=3, max_digits=4, operations="-", seed=7)
    for row in task.rows("sft", 200):
        a, op, b = _check_row(row)
        assert op == "-" and 100 <= b <= a <= 9999
        # One "write" line per column, the borrow of the last one is 0.
        steps = row["completion"].split("</think>")[0].strip().splitlines()[1:]
        assert len(steps) == len(str(a)) and steps[-1].endswith("borrow 0")


def test_builtin_task_too_few_problems_is_a_config_error():
    # One-digit sums: 100 problems, about 10 held out; asking for 50 held-out ones must not loop forever.
    with pytest.raises(ConfigError, match="found only .* distinct 'eval' problems"):
        ArithmeticTask(max_digits=1, operations="+").rows("eval", 50)
    with pytest.raises(ConfigError, match="min_digits"):
        ArithmeticTask(min_digits=3, max_digits=2)
    with pytest.raises(ConfigError, match="operations"):
        ArithmeticTask(operations="*")


def test_json_values_reach_the_rows_exactly_as_written(tmp_path):
    # Arrow would unify these types (1 → 1.0, missing dict keys → None, or fail on str/int mixes);
    # the rows must keep what the user wrote.
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "a", "answer": 1, "meta": {"x": 1}}, {"prompt": "b", "answer": "two", "meta": {"y": 2.5}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(load_rows(str(path))) == rows


def test_a_row_missing_the_prompt_names_the_row(tmp_path, builtin_tokenizer):
    path = tmp_path / "gap.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"completion": "c"}\n')
    module = ColdStartDataModule(path=str(path), tokenizer=builtin_tokenizer)
    with pytest.raises(DataError, match=re.escape(f"{path}:2: 'prompt' must be")):  # the file line, 1-based
        module.setup("fit")


def test_word_problems_ask_the_same_problems_in_english():
    compute, words = ArithmeticTask(), ArithmeticTask(prompt_style="words")
    for split in ("rl", "eval"):
        a, b = compute.rows(split, 40), words.rows(split, 40)
        # Same problems, answers and worked solutions (so the same held-out split); only the wording differs.
        assert [(r["answer"], r["completion"]) for r in a] == [(r["answer"], r["completion"]) for r in b]
        assert all(r["prompt"].startswith("Compute ") for r in a) and not any(r["prompt"].startswith("Compute ") for r in b)
    # "Compute 47+385." -> both operands appear in the question.
    for row, plain in zip(words.rows("eval", 40), compute.rows("eval", 40)):
        x, y = plain["prompt"][len("Compute "):-1].replace("-", "+").split("+")
        assert x in row["prompt"] and y in row["prompt"]
    with pytest.raises(ConfigError, match="task.prompt_style='latex': choose compute or words"):
        ArithmeticTask(prompt_style="latex")
