"""Pure helpers that find the reasoning and the final answer in an R1-style completion.

The R1 layout is `<think>\\nreasoning\\n</think>\\n<answer>\\nanswer\\n</answer>`; many
models (e.g. DeepSeek-R1-Distill) drop the answer tags and write the answer after
`</think>`. These helpers accept both.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def extract_reasoning(text: str) -> str | None:
    """The reasoning of a completion, stripped of surrounding whitespace.

    - `<think>R</think>...` → `R`;
    - `R</think>...` (the opening tag was in the prompt) → `R`;
    - `<think>R` (truncated before `</think>`) → `R`;
    - no think tag at all → `None`.
    """
    close = text.find(THINK_CLOSE)
    open_ = text.find(THINK_OPEN)
    if close == -1:
        return text[open_ + len(THINK_OPEN) :].strip() if open_ != -1 else None
    start = open_ + len(THINK_OPEN) if -1 < open_ < close else 0
    return text[start:close].strip()


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, stripped of surrounding whitespace.

    Looks after the last `</think>` (or in the whole text if there is none) for the last
    `<answer>...</answer>` block; an `<answer>` left open by truncation counts up to
    the end of the text. Without answer tags, the text after `</think>` is the answer.

    Returns:
        The answer, or `None` when the completion has neither answer tags nor `</think>`.
    """
    think_end = text.rfind(THINK_CLOSE)
    region = text[think_end + len(THINK_CLOSE) :] if think_end != -1 else text
    open_ = region.rfind(ANSWER_OPEN)
    if open_ != -1:
        body = region[open_ + len(ANSWER_OPEN) :]
        close = body.find(ANSWER_CLOSE)
        return (body[:close] if close != -1 else body).strip()
    return region.strip() if think_end != -1 else None


def restore_think_prefill(prompt_text: str, completion: str) -> str:
    """Put back a `<think>` that the chat template wrote at the end of the prompt.

    Templates such as DeepSeek-R1-Distill's end the rendered prompt with `"<think>\\n"`,
    so the model's completion starts inside the reasoning and lacks the opening tag. Format
    rewards must see the whole layout, so the prompt's trailing `<think>` (with the
    whitespace that follows it, which the strict layout depends on) is prepended.

    Args:
        prompt_text: The prompt exactly as rendered by the chat template.
        completion: The generated text.

    Returns:
        `completion` with the prompt's trailing `<think>...` prepended, or unchanged when
        the prompt does not end in `<think>` or the completion already opens with it.
    """
    start = prompt_text.rfind(THINK_OPEN)
    if start == -1 or prompt_text[start + len(THINK_OPEN) :].strip():
        return completion
    if completion.lstrip().startswith(THINK_OPEN):
        return completion
    return prompt_text[start:] + completion
