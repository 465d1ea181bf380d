"""The ``r1-lightning`` command: a LightningCLI (fit / validate / test / predict) plus ``recipe``.

    r1-lightning fit --config configs/sft.yaml [--model.learning_rate 3e-4 ...]
    r1-lightning recipe configs/recipes/r1_tiny.yaml

Model and data are picked by ``class_path`` (any LightningModule / LightningDataModule,
including the user's own). Errors in the user's input print one message and exit 1.
"""

from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from r1_lightning.errors import UserError


class R1CLI(LightningCLI):
    """LightningCLI with subclass mode for model and data and the project's defaults."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # each module configures its own AdamW + schedule
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] == "recipe":
            from r1_lightning.recipe import main as recipe_main

            recipe_main(argv[1:])
        else:
            R1CLI(args=args)  # None: LightningCLI reads sys.argv itself (passing both makes it warn)
    except Exception as error:
        user_error = _find_user_error(error)
        if user_error is None or os.environ.get("R1_DEBUG"):
            raise
        print(f"r1-lightning: error: {user_error}", file=sys.stderr)
        sys.exit(1)


def _find_user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind ``error``: jsonargparse wraps errors raised while instantiating classes."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


if __name__ == "__main__":
    main()
