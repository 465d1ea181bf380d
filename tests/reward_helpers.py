"""Shared pieces of the reward tests."""

NAN = float("nan")
STRICT = "<think>\nreason\n</think>\n<answer>\n42\n</answer>"


def score(reward, completion, **row):
    """One completion through the public reward signature."""
    (value,) = reward([completion], prompts=["p"], **{key: [value] for key, value in row.items()})
    return value
