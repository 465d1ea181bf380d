"""The G rows of a prompt: one rule, written once.

A batch of B prompts becomes B*G completions, and a prompt's G completions are G *consecutive*
rows (prompt b owns rows b*G .. b*G + G - 1). The rollout produces them in that order, rewards
are called on whole groups, and the advantages, losses and dynamic sampling read them back in
that order. These helpers are the only place that rule is spelt out.
"""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor

T = TypeVar("T")


def check_groups(num_rows: int, num_generations: int, what: str = "rows") -> None:
    """Raise a ValueError unless `num_rows` splits into whole groups of `num_generations`."""
    if num_generations < 1 or num_rows % num_generations:
        raise ValueError(f"{what}: {num_rows} rows cannot be split into groups of num_generations={num_generations}")


def group_view(values: Tensor, num_generations: int) -> Tensor:
    """`[B*G, ...]` → `[B, G, ...]`: row b of the result is prompt b's group (a view, no copy)."""
    check_groups(values.shape[0] if values.dim() else 0, num_generations, f"a tensor of shape {tuple(values.shape)}")
    return values.reshape(-1, num_generations, *values.shape[1:])


def per_completion(values: Tensor, num_generations: int) -> Tensor:
    """`[B, ...]` one entry per prompt → `[B*G, ...]` one per completion (each repeated G times)."""
    return values.repeat_interleave(num_generations, dim=0)


def repeat_per_completion(values: list[T], num_generations: int) -> list[T]:
    """A per-prompt list → a per-completion list: `[a, b]` with G=2 → `[a, a, b, b]`."""
    return [value for value in values for _ in range(num_generations)]


def group_of(row: int, num_generations: int) -> int:
    """The prompt (group) index of completion row `row`."""
    return row // num_generations


def group_rows(group: int, num_generations: int) -> slice:
    """The rows of prompt `group`'s completions."""
    return slice(group * num_generations, (group + 1) * num_generations)


def group_indices(group: int, num_generations: int) -> range:
    """The row indices of prompt `group`'s completions (`group_rows` as a range)."""
    rows = group_rows(group, num_generations)
    return range(rows.start, rows.stop)


def split_groups(values: list[T], num_generations: int) -> list[list[T]]:
    """A per-completion list → one list per prompt: `[a1, a2, b1, b2]` with G=2 → `[[a1, a2], [b1, b2]]`."""
    check_groups(len(values), num_generations, "a per-completion list")
    return [values[group_rows(b, num_generations)] for b in range(len(values) // num_generations)]
