"""Length-based rewards, and the length measure they share (characters or tokens)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from r1_lightning.rewards.base import Reward


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer  # only needed when lengths are counted in tokens

    return AutoTokenizer.from_pretrained(name_or_path)


def text_lengths(texts: Sequence[str], tokenizer: str | None = None) -> list[int]:
    """Length of each text: characters, or tokens of `tokenizer` (no special tokens added).

    Args:
        texts: The texts to measure.
        tokenizer: Hugging Face tokenizer name or local directory, loaded once and cached;
            `None` counts characters.
    """
    if tokenizer is None or not texts:
        return [len(text) for text in texts]
    encoded = _load_tokenizer(tokenizer)(list(texts), add_special_tokens=False)
    return [len(ids) for ids in encoded["input_ids"]]


class SoftOverlong(Reward):
    """DAPO's soft over-long punishment (Yu et al. 2025, https://arxiv.org/abs/2503.14476, eq. 13).

    With L = completion length, L_max = `max_length`, L_cache = `cache_length`:

        R(L) = 0                               if L <= L_max - L_cache
               (L_max - L_cache - L) / L_cache  if L_max - L_cache < L <= L_max
               -1                              if L > L_max

    Add it to the correctness reward (weight 1) so that answers running close to the
    generation limit lose reward gradually instead of being cut off without a signal.

    Lengths are in characters unless `tokenizer` is given. DAPO counts tokens; to match it
    exactly, pass the policy's tokenizer and set `max_length` to the module's `max_new_tokens`.

    Args:
        max_length: L_max, the length at which the punishment reaches -1.
        cache_length: L_cache, the width of the linear ramp before `max_length`.
        tokenizer: Hugging Face tokenizer name or local directory to count tokens with;
            `None` counts characters.
    """

    def __init__(self, max_length: int = 4096, cache_length: int = 1024, tokenizer: str | None = None) -> None:
        if not 0 < cache_length <= max_length:
            raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length} and {max_length}")
        self.max_length = max_length
        self.cache_length = cache_length
        self.tokenizer = tokenizer

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return [self._punish(length) for length in text_lengths(completions, self.tokenizer)]

    def _punish(self, length: int) -> float:
        ramp_start = self.max_length - self.cache_length
        if length <= ramp_start:
            return 0.0
        if length <= self.max_length:
            return (ramp_start - length) / self.cache_length
        return -1.0
