"""DeepSeek-R1's language-consistency reward, by Unicode script (no extra dependencies)."""

from __future__ import annotations

import bisect
import re
from typing import Any

from r1_lightning.rewards.base import Reward, score_each
from r1_lightning.rewards.parsing import extract_reasoning

# Code point ranges of the scripts we tell apart (inclusive). Only letters are ever
# looked up, so ranges may include a script's punctuation.
_SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": (
        (0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF),
        (0xFF21, 0xFF3A), (0xFF41, 0xFF5A),  # fullwidth A-Z, a-z
    ),
    "han": (
        (0x2E80, 0x2FDF), (0x3005, 0x3007), (0x3021, 0x3029), (0x3038, 0x303B),
        (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF),
    ),
    "hiragana": ((0x3040, 0x309F),),
    "katakana": ((0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF)),
    "cyrillic": ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "hebrew": ((0x0590, 0x05FF),),
    "devanagari": ((0x0900, 0x097F),),
    "thai": ((0x0E00, 0x0E7F),),
}  # fmt: skip

# Language code → the scripts its text is written in.
_LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"latin"}) for code in ("en", "fr", "de", "es", "it", "pt", "nl", "vi", "id", "tr", "pl")},
    "zh": frozenset({"han"}),
    "ja": frozenset({"han", "hiragana", "katakana"}),
    "ko": frozenset({"hangul", "han"}),
    "ru": frozenset({"cyrillic"}),
    "uk": frozenset({"cyrillic"}),
    "el": frozenset({"greek"}),
    "ar": frozenset({"arabic"}),
    "fa": frozenset({"arabic"}),
    "he": frozenset({"hebrew"}),
    "hi": frozenset({"devanagari"}),
    "th": frozenset({"thai"}),
}

_RANGES = sorted((lo, hi, script) for script, ranges in _SCRIPT_RANGES.items() for lo, hi in ranges)
_STARTS = [lo for lo, _, _ in _RANGES]

# Scripts written without spaces between words: each character counts as one word.
_PER_CHAR = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for s in ("han", "hiragana", "katakana") for lo, hi in _SCRIPT_RANGES[s])
# A word: one per-character-script character, or a run of other letters ([^\W\d_] = letters).
_WORD = re.compile(f"[{_PER_CHAR}]|(?:(?![{_PER_CHAR}])[^\\W\\d_])+")


def script_of(char: str) -> str | None:
    """The script of a character ("latin", "han", ...), or None if not one we know."""
    i = bisect.bisect_right(_STARTS, ord(char)) - 1
    if i >= 0 and ord(char) <= _RANGES[i][1]:
        return _RANGES[i][2]
    return None


def script_words(text: str) -> list[str | None]:
    """The script of each word of `text` (by its first letter); digits and symbols are skipped."""
    return [script_of(word[0]) for word in _WORD.findall(text)]


class LanguageConsistency(Reward):
    """Share of the reasoning's words written in the target language's script (DeepSeek-R1,
    https://arxiv.org/abs/2501.12948, section 2.3.3: "the proportion of target language words
    in the CoT").

        reward = words in a target script / all words

    Reads the reasoning inside `<think>...</think>`, or the whole completion without think
    tags. Words are runs of letters; in Chinese and Japanese each character is a word.
    Digits, punctuation and symbols are ignored; a text without words scores `None`. The
    check is by script, so it tells English from Chinese or Russian, but not from French.

    Args:
        target: Language code (en, fr, de, es, it, pt, nl, vi, id, tr, pl, zh, ja, ko, ru,
            uk, el, ar, fa, he, hi, th) or script name (latin, han, hiragana, katakana,
            hangul, cyrillic, greek, arabic, hebrew, devanagari, thai).
    """

    def __init__(self, target: str = "en") -> None:
        key = target.lower()
        if key in _LANGUAGE_SCRIPTS:
            self.scripts = _LANGUAGE_SCRIPTS[key]
        elif key in _SCRIPT_RANGES:
            self.scripts = frozenset({key})
        else:
            known = sorted(_LANGUAGE_SCRIPTS) + sorted(_SCRIPT_RANGES)
            raise ValueError(f"unknown target {target!r}; use one of {', '.join(known)}")
        self.target = target

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return score_each(self._score, completions)

    def _score(self, completion: str) -> float | None:
        reasoning = extract_reasoning(completion)
        scripts = script_words(completion if reasoning is None else reasoning)
        if not scripts:
            return None
        return sum(script in self.scripts for script in scripts) / len(scripts)
