import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from r1_lightning.rewards import (
    Accuracy,
    CosineScaledAccuracy,
    FailedScore,
    LanguageConsistency,
    LenientFormat,
    ReasoningSteps,
    RepetitionPenalty,
    SoftOverlong,
    StrictFormat,
    TagCount,
    extract_answer,
    extract_reasoning,
    restore_think_prefill,
)
from r1_lightning.rewards import accuracy as accuracy_module
from r1_lightning.rewards.length import text_lengths

from reward_helpers import STRICT, score

R1_DISTILL_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is 6 * 7?<｜Assistant｜><think>\n"


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        # The full R1 layout.
        (STRICT, "reason", "42"),
        # Distill style: the answer follows </think> without answer tags.
        ("<think>r</think>\nThe answer is 7.", "r", "The answer is 7."),
        # The opening <think> was in the prompt: the reasoning starts the completion.
        ("r</think><answer>5</answer>", "r", "5"),
        # Truncated inside the reasoning: no answer yet.
        ("<think>still going", "still going", None),
        # An <answer> inside the reasoning is not the final answer.
        ("<think>try <answer>1</answer></think><answer>2</answer>", "try <answer>1</answer>", "2"),
        # Truncated inside the answer: what was written counts.
        ("<think>r</think><answer>\n3", "r", "3"),
        # No tags at all.
        ("just text 9", None, None),
    ],
)
def test_extract_reasoning_and_answer(text, reasoning, answer):
    assert extract_reasoning(text) == reasoning
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        # R1-Distill template ends in "<think>\n": the tag and its newline go back in front.
        (R1_DISTILL_PROMPT, "reason\n</think>\n<answer>\n42\n</answer>", STRICT),
        # Trailing whitespace after <think> in the prompt is part of what the model saw.
        ("Q<think>  \n", "r</think>", "<think>  \nr</think>"),
        # The prompt does not open <think>: unchanged.
        ("<｜Assistant｜>", "<think>\nr\n</think>", "<think>\nr\n</think>"),
        # <think> appears in the prompt but is closed/followed by text: unchanged.
        ("Use <think> tags. Answer:", "r</think>", "r</think>"),
        # The completion already opens <think> (the template prefills, the model repeats it): unchanged.
        (R1_DISTILL_PROMPT, "<think>\nr\n</think>", "<think>\nr\n</think>"),
    ],
)
def test_restore_think_prefill(prompt, completion, expected):
    assert restore_think_prefill(prompt, completion) == expected


def test_prefilled_completion_scores_full_format_only_after_restoring():
    # The model's completion under an R1-Distill template lacks the opening tag it never generated.
    completion = "reason\n</think>\n<answer>\n42\n</answer>"
    restored = restore_think_prefill(R1_DISTILL_PROMPT, completion)
    for reward in (StrictFormat(), LenientFormat(), TagCount()):
        assert score(reward, completion) < 1.0
        assert score(reward, restored) == 1.0


# ---------------------------------------------------------------- format rewards


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # The exact layout.
        (STRICT, 1.0),
        # A newline before end-of-sequence is allowed.
        (STRICT + "\n", 1.0),
        # Right tags, missing newlines.
        ("<think>reason</think><answer>42</answer>", 0.0),
        # Text before the reasoning.
        ("Sure! " + STRICT, 0.0),
        # Text after the answer.
        (STRICT + " Hope that helps.", 0.0),
        # A second answer block would be swallowed by a lazy regex; tags must occur once.
        ("<think>\na\n</think>\n<answer>\n1\n</answer>\n<answer>\n2\n</answer>", 0.0),
        # No answer tags.
        ("<think>\nreason\n</think>\n42", 0.0),
        # The prefilled <think> was not restored.
        ("reason\n</think>\n<answer>\n42\n</answer>", 0.0),
    ],
)
def test_strict_format(completion, expected):
    assert score(StrictFormat(), completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # No newlines needed.
        ("<think>r</think><answer>42</answer>", 1.0),
        # Whitespace anywhere around and inside the blocks.
        ("  <think>\n r \n</think>\n\n<answer> 42 </answer>\n", 1.0),
        # Text between the blocks.
        ("<think>r</think> The answer is <answer>42</answer>", 0.0),
        # Wrong order.
        ("<answer>42</answer><think>r</think>", 0.0),
        # No answer block.
        ("<think>r</think> 42", 0.0),
        # Two reasoning blocks.
        ("<think>a</think><think>b</think><answer>1</answer>", 0.0),
    ],
)
def test_lenient_format(completion, expected):
    assert score(LenientFormat(), completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # All four pieces once.
        (STRICT, 1.0),
        # Reasoning tags only: <think>\n and \n</think>\n.
        ("<think>\nr\n</think>\n42", 0.5),
        # <think>\n twice loses that piece only.
        ("<think>\na<think>\nb\n</think>\n<answer>\n1\n</answer>", 0.75),
        # Tags without their newlines earn nothing.
        ("<think>r</think><answer>1</answer>", 0.0),
        # No tags.
        ("42", 0.0),
    ],
)
def test_tag_count(completion, expected):
    assert score(TagCount(), completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # Three "Step N:" markers: full reward.
        ("Step 1: a\nStep 2: b\nStep 3: c", 1.0),
        # Two numbered lines, anywhere in the text: 2/3.
        ("Plan:\n1. add\n2. check", 2 / 3),
        # Four bullets: capped at 1.
        ("- a\n* b\n- c\n- d", 1.0),
        # Sentence openers.
        ("First, add. Finally, check.", 2 / 3),
        # A decimal is not a numbered line.
        ("3.14 is close to pi", 0.0),
        # No steps.
        ("The answer is 4.", 0.0),
    ],
)
def test_reasoning_steps(completion, expected):
    assert score(ReasoningSteps(), completion) == pytest.approx(expected)


def test_reasoning_steps_min_steps():
    # One step out of min_steps=1 is already full reward; out of 3 it is a third.
    assert score(ReasoningSteps(min_steps=1), "Step 1: go") == 1.0
    assert score(ReasoningSteps(), "Step 1: go") == pytest.approx(1 / 3)


# ---------------------------------------------------------------- accuracy (math-verify)


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        # LaTeX fraction reference, decimal prediction.
        ("<think>x</think><answer>0.5</answer>", "\\frac{1}{2}", 1.0),
        # Decimal reference, \boxed fraction after </think> without answer tags.
        ("<think>x</think>\nSo it is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0),
        # Plain integers.
        ("<think>x</think><answer>42</answer>", "42", 1.0),
        # A wrong answer.
        ("<think>x</think><answer>41</answer>", "42", 0.0),
        # A numeric reference column.
        ("<think>x</think><answer>7</answer>", 7, 1.0),
        # Bare LaTeX in the answer and in the reference is read as math.
        ("<think>x</think><answer>\\sqrt{2}</answer>", "\\sqrt 2", 1.0),
        # ... and not as its leading number (undelimited, math-verify would read 3).
        ("<think>x</think><answer>3\\sqrt{2}</answer>", "3", 0.0),
        # An equation answer is compared by its value.
        ("<think>x</think><answer>x = 5</answer>", "5", 1.0),
        # Only the final answer counts, not one inside the reasoning.
        ("<think>maybe <answer>5</answer></think><answer>6</answer>", "5", 0.0),
        # No tags at all: the whole completion is searched.
        ("The answer is \\boxed{5}", "5", 1.0),
        # No answer in the completion.
        ("<think>x</think><answer>no idea</answer>", "5", 0.0),
        # Unparsable reference: not applicable.
        ("<think>x</think><answer>5</answer>", "\\frac{", None),
        # Empty and missing references: not applicable.
        ("<think>x</think><answer>5</answer>", "", None),
        ("<think>x</think><answer>5</answer>", None, None),
    ],
)
def test_accuracy(accuracy, completion, answer, expected):
    assert score(accuracy, completion, answer=answer) == expected


def test_accuracy_batch_and_extra_columns(accuracy):
    # Two groups of G=2, with an extra column the reward must ignore.
    completions = ["\\boxed{4}", "\\boxed{5}", "\\boxed{9}", "\\boxed{9}"]
    scores = accuracy(completions, prompts=["a", "a", "b", "b"], answer=["4", "4", "9", "9"], source=["x"] * 4)
    assert scores == [1.0, 0.0, 1.0, 1.0]


def test_accuracy_without_fallback_scores_untagged_completions_zero(accuracy):
    # Truncated inside the reasoning: with the fallback the "answer is 7" in it is found.
    completion = "<think>so the answer is 7"
    assert score(accuracy, completion, answer="7") == 1.0
    reward = Accuracy(fallback_to_completion=False)
    assert score(reward, completion, answer="7") == 0.0  # decided without starting workers
    assert reward._pool is None


def test_accuracy_answer_column_and_missing_column(accuracy):
    reward = Accuracy(answer_column="solution")
    reward._pool = accuracy._get_pool()  # share the module's workers
    assert score(reward, "\\boxed{3}", solution="3") == 1.0
    with pytest.raises(KeyError, match="'solution'.*columns \\['answer'\\]"):
        score(reward, "\\boxed{3}", answer="3")


def test_accuracy_from_a_worker_thread(accuracy):
    # math-verify's signal-based timeouts fail off the main thread; ours must not.
    result = {}

    def run():
        try:
            result["scores"] = accuracy(["\\boxed{2}", "\\boxed{3}"], prompts=["p", "p"], answer=["2", "2"])
        except Exception as exc:  # noqa: BLE001  surfaced by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert result == {"scores": [1.0, 0.0]}


SLOW_VERIFY_S = 120  # far beyond the call's 33 s on a loaded 2-core CI machine (fresh workers start slowly there)


def _slow_verify(prediction, reference):
    if prediction == "slow":
        time.sleep(SLOW_VERIFY_S)
    if prediction == "crash":
        os._exit(3)
    if prediction == "raise":
        raise ValueError("unparsable")
    return 1.0


def test_accuracy_reports_hung_crashed_and_raising_samples_as_failed_not_zero(monkeypatch):
    # A verification that hangs (sympy on a pathological expression) is killed at the time
    # limit; one that crashes its worker or raises fails too. Each such sample gets a
    # FailedScore (the RewardSet applies on_error to it and counts it), never a 0.0 that
    # would pass for a wrong answer; the samples around it are still scored by fresh workers.
    monkeypatch.setattr(accuracy_module, "_verify_sample", _slow_verify)
    reward = Accuracy(timeout=0.5)
    try:
        start = time.monotonic()
        scores = reward(["ok", "slow", "ok", "crash", "raise", "ok"], prompts=["p"] * 6, answer=["1"] * 6)
        assert time.monotonic() - start < 0.75 * SLOW_VERIFY_S  # the slow sample was not waited for
        assert scores[0] == scores[2] == scores[5] == 1.0
        assert scores[1] == FailedScore("took longer than timeout=0.5s to verify (its worker process was killed)")
        assert scores[3] == FailedScore("crashed its math-verify worker process")
        assert scores[4] == FailedScore("raised ValueError: unparsable in math-verify")
    finally:
        reward.close()


def _alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_until_gone(pids: list[int], timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


PATHOLOGICAL = "<answer>9^{9^{9^{9^{9}}}}</answer>"  # sympy tries to evaluate the power tower: it never ends


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_math_verify_on_a_power_tower_fails_within_its_timeout_from_a_thread_and_leaves_no_process():
    reward = Accuracy(timeout=1.0)
    try:
        assert reward(["\\boxed{2}"], prompts=["p"], answer=["2"]) == [1.0]  # starts the worker
        (old,) = [w.process.pid for w in reward._pool._workers]
        result = {}
        batch = dict(prompts=["p"] * 2, answer=["2"] * 2)
        thread = threading.Thread(target=lambda: result.setdefault("scores", reward([PATHOLOGICAL, "\\boxed{2}"], **batch)))
        start = time.monotonic()
        thread.start()
        thread.join(timeout=120)
        assert time.monotonic() - start < 60  # about the 1 s timeout plus a worker restart, not forever
        first, second = result["scores"]
        assert isinstance(first, FailedScore) and "took longer than timeout=1s" in first.reason and second == 1.0
        assert not _alive(old)  # the stuck worker was killed and reaped, not left running
        assert all(_alive(w.process.pid) for w in reward._pool._workers)  # and replaced
    finally:
        reward.close()


_ORPHAN_SCRIPT = """
import sys, threading, time
from r1_lightning.rewards import Accuracy
from r1_lightning.rewards.accuracy import _verify_sample
reward = Accuracy(timeout=600.0, num_workers=2)
if sys.argv[1] == "exit":  # started from a thread that then exits: the workers must outlive it
    starter = threading.Thread(target=lambda: reward(["\\\\boxed{1}"], prompts=["p"], answer=["1"]))
    starter.start(); starter.join()
else:  # started from the main thread, which asks Linux to kill them with the parent
    reward(["\\\\boxed{1}"], prompts=["p"], answer=["1"])
print(" ".join(str(w.process.pid) for w in reward._pool._workers), flush=True)
if sys.argv[1] == "busy":  # one worker stuck in sympy, in a C call that cannot check on its parent
    threading.Thread(target=lambda: reward(["PATHOLOGICAL"], prompts=["p"], answer=["1"]), daemon=True).start()
    time.sleep(3)
    print("ready", flush=True)
    time.sleep(600)
""".replace("PATHOLOGICAL", PATHOLOGICAL.replace("\\", "\\\\"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "ending",
    [
        # The interpreter exits normally: multiprocessing ends its daemon workers.
        "exit",
        # The parent is SIGKILLed while a worker is stuck verifying: the kernel kills the worker.
        "busy",
    ],
)
def test_accuracy_workers_never_outlive_their_parent(tmp_path, ending):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _ORPHAN_SCRIPT, ending]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(map(_alive, pids))
        if ending == "busy":
            assert parent.stdout.readline().strip() == "ready"
            assert all(map(_alive, pids))  # both alive while the parent is
            parent.send_signal(signal.SIGKILL)
        assert parent.wait(timeout=120) in (0, -signal.SIGKILL)
        assert _wait_until_gone(pids) == []
    finally:
        parent.kill()


def test_accuracy_pickles_without_its_pool(accuracy):
    # Lightning may pickle or deepcopy a module holding rewards; worker processes cannot travel.
    copy = pickle.loads(pickle.dumps(accuracy))
    assert copy._pool is None and copy.timeout == accuracy.timeout


# ---------------------------------------------------------------- length and repetition


@pytest.mark.parametrize(
    ("length", "correct", "expected"),
    [
        # r(L) = r_L + (r_0 - r_L)(1 + cos(pi L / 40)) / 2 with L_max = 40.
        # Correct at L = 20: cos(pi/2) = 0 → 0.5 + 0.5 * 1/2 = 0.75.
        (20, True, 0.75),
        # Correct at L_max: cos(pi) = -1 → r_L = 0.5.
        (40, True, 0.5),
        # Wrong at L = 20: -0.5 + (-1 + 0.5) * 1/2 = -0.75.
        (20, False, -0.75),
        # Wrong at L_max: the mildest penalty, -0.5.
        (40, False, -0.5),
        # Correct at L = 10: 0.5 + 0.5 (1 + cos(pi/4)) / 2 = 0.5 + 0.25 (1 + sqrt(2)/2) ≈ 0.9268.
        (10, True, 0.5 + 0.25 * (1 + math.sqrt(2) / 2)),
        # Longer than L_max: held at r_L (no exceed_value set).
        (60, True, 0.5),
    ],
)
def test_cosine_scaled_accuracy(accuracy, length, correct, expected):
    reward = CosineScaledAccuracy(max_length=40)
    reward.accuracy = accuracy  # share the module's workers
    completion = "\\boxed{4}".rjust(length)  # padded to exactly `length` characters
    assert len(completion) == length
    assert score(reward, completion, answer="4" if correct else "5") == pytest.approx(expected)


def test_cosine_scaled_accuracy_exceed_value_and_unparsable_reference(accuracy):
    reward = CosineScaledAccuracy(max_length=40, exceed_value=-2.0)
    reward.accuracy = accuracy
    # Past L_max the paper's r_exceed applies, correct or not.
    assert score(reward, "\\boxed{4}".rjust(41), answer="4") == -2.0
    # Unparsable reference: None, not a length-scaled 0.
    assert score(reward, "\\boxed{4}", answer="\\frac{") is None


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # Trigrams abc, bca, cab, abc: 3 unique of 4 → -1 * (1 - 3/4).
        ("a b c a b c", -0.25),
        # Case is ignored: the same as above.
        ("A b C a B c", -0.25),
        # "go" x5: trigrams 3, unique 1 → -(1 - 1/3).
        ("go go go go go", -2 / 3),
        # No repeated trigram.
        ("the cat sat on the mat", 0.0),
        # Fewer words than n, and empty text: nothing to penalise.
        ("hi hi", 0.0),
        ("", 0.0),
    ],
)
def test_repetition_penalty(completion, expected):
    assert score(RepetitionPenalty(), completion) == pytest.approx(expected)


def test_repetition_penalty_settings():
    # Bigrams of "a b a b": ab, ba, ab → 2 unique of 3 → -0.5 * (1 - 2/3).
    assert score(RepetitionPenalty(ngram_size=2, max_penalty=-0.5), "a b a b") == pytest.approx(-0.5 / 3)
    with pytest.raises(ValueError, match="max_penalty"):
        RepetitionPenalty(max_penalty=0.5)


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        # L_max = 10, L_cache = 4: no punishment up to 6.
        (3, 0.0),
        (6, 0.0),
        # On the ramp: (6 - 8) / 4.
        (8, -0.5),
        # At and beyond L_max: -1.
        (10, -1.0),
        (11, -1.0),
    ],
)
def test_soft_overlong(length, expected):
    assert score(SoftOverlong(max_length=10, cache_length=4), "x" * length) == pytest.approx(expected)


def test_soft_overlong_rejects_a_cache_longer_than_the_limit():
    with pytest.raises(ValueError, match="cache_length"):
        SoftOverlong(max_length=10, cache_length=20)


def test_lengths_in_tokens(tmp_path):
    # A word-level tokenizer saved locally: lengths count its tokens, not characters.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    assert text_lengths(["hello world", "hello"], str(tmp_path)) == [2, 1]
    assert text_lengths(["hello world"]) == [11]
    # 5 tokens with L_max = 6, L_cache = 2: (4 - 5) / 2.
    assert score(SoftOverlong(max_length=6, cache_length=2, tokenizer=str(tmp_path)), "hello " * 5) == -0.5


# ---------------------------------------------------------------- language consistency


@pytest.mark.parametrize(
    ("target", "completion", "expected"),
    [
        # English reasoning; the Chinese answer after </think> is not judged.
        ("en", "<think>Let me think about this</think>答案是 4", 1.0),
        # 4 Han characters (one word each) and 2 English words: 2/6.
        ("en", "<think>首先计算 then add</think>", 2 / 6),
        # The same reasoning judged for Chinese: 4/6.
        ("zh", "<think>首先计算 then add</think>", 4 / 6),
        # Digits and symbols are not words; nothing left to judge.
        ("en", "<think>12 + 7 = 19</think>", None),
        # Without think tags the whole completion is the reasoning.
        ("en", "plain english text", 1.0),
        # Japanese mixes Han and kana; all of it is Japanese.
        ("ja", "<think>これは数学です</think>", 1.0),
        # Cyrillic vs Latin.
        ("ru", "<think>Привет world</think>", 0.5),
        # A script name works as a target too; accented Latin letters are Latin.
        ("latin", "<think>café déjà vu</think>", 1.0),
    ],
)
def test_language_consistency(target, completion, expected):
    result = score(LanguageConsistency(target), completion)
    assert result == (None if expected is None else pytest.approx(expected))


def test_language_consistency_unknown_target():
    with pytest.raises(ValueError, match="unknown target 'klingon'.*zh"):
        LanguageConsistency("klingon")
