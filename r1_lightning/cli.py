"""The ``r1-lightning`` command: a LightningCLI (fit / validate / test / predict) plus ``recipe``.

    r1-lightning fit --config configs/sft.yaml [--model.learning_rate 3e-4 ...]
    r1-lightning recipe configs/recipes/r1_tiny.yaml

Model and data are picked by ``class_path`` (any LightningModule / LightningDataModule,
including the user's own). Errors in the user's input print one message and exit 1. Besides
LightningCLI's behaviour: a checkpoint never changes the configuration, SIGTERM / Ctrl-C save the
step reached and exit 143 / 130, a fresh fit refuses an earlier run's checkpoint directory, and
validate / test / predict save ``<subcommand>_config.yaml`` (README, "Failure behaviour").
"""

from __future__ import annotations

import os
import re
import signal
import sys
from argparse import ArgumentError

from lightning.pytorch.utilities.exceptions import SIGTERMException

from r1_lightning.errors import UserError
from r1_lightning.lightning_cli import SUBCOMMANDS, QuietKnownWarnings, R1CLI
from r1_lightning.recipe import main as recipe_main
from r1_lightning.rl import cpu_matmul

__all__ = ["R1CLI", "QuietKnownWarnings", "main"]  # R1CLI and its callback live in r1_lightning.lightning_cli


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    try:
        cpu_matmul.check()  # an environment variable and a cache file read deep inside training: refused before any work
        if argv and argv[0] == "recipe":
            recipe_main(argv[1:])
        else:
            R1CLI(args=args)  # None: LightningCLI reads sys.argv itself (passing both makes it warn)
    except SIGTERMException:  # Lightning's own handler stopped validate / test / predict: not a success
        sys.exit(128 + signal.SIGTERM)
    except ArgumentError as error:  # the command line or a YAML file was not accepted
        if os.environ.get("R1_DEBUG"):
            raise
        print(f"r1-lightning: error: {with_recipe(parse_error_line(str(error), argv))}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        user_error = _find_user_error(error)
        if user_error is None or os.environ.get("R1_DEBUG"):
            raise
        print(f"r1-lightning: error: {user_error}", file=sys.stderr)
        sys.exit(1)


# Lines of a jsonargparse message that only describe its own type machinery.
_NOISE = re.compile(
    r"^(Does not validate against any of the (Union )?subtypes|Subtypes:|Errors:|Expected a <class 'NoneType'>"
    r"|Given value( type)?:"
    r"|Expected a path but .* either not accessible or invalid)"
)


def with_recipe(message: str) -> str:
    """LightningCLI's list of subcommands, plus ``recipe`` (handled before LightningCLI sees the command line)."""
    listed = ",".join(SUBCOMMANDS)
    message = message.replace("{" + listed + "}", "{" + listed + ",recipe}")
    return message.replace(", ".join(map(repr, SUBCOMMANDS)) + ")", ", ".join(map(repr, (*SUBCOMMANDS, "recipe"))) + ")")


def parse_error_line(message: str, argv: list[str]) -> str:
    """jsonargparse's nested, multi-line message as one line: the option's full key and the innermost reason.

    ``Parser key "model": ... class_path 'r1_lightning.PolicySFT': Parser key "learning_rate": Expected a
    <class 'float'>. Got value: fast`` becomes ``model.learning_rate: expected a float, got value: fast
    (class_path r1_lightning.PolicySFT)``.
    """
    keys, class_path, reasons = [], None, []
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or _NOISE.match(line):
            continue
        key = re.match(r'^Parser key "([^"]+)":\s*(.*)$', line)
        if key:
            keys.append(key.group(1))
            line = key.group(2)
        problem = re.match(r"^Problem with given class_path '([^']+)':\s*(.*)$", line)
        if problem:
            class_path, line = problem.group(1), problem.group(2)
        if line:
            reasons.append(line)
    reason = reasons[-1] if keys and reasons else " ".join(reasons) or message.strip()
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason)
    reason = re.sub(r"^Type .+? expects a function or a callable class: ", "expects a function or a callable class: ", reason)
    if reason.startswith("Problems parsing config"):  # a YAML syntax error: name the file(s)
        configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
        reason += f" (--config {', '.join(configs)})" if configs else ""
    text = f"{'.'.join(keys)}: {reason}" if keys else reason
    return text + (f" (class_path {class_path})" if class_path else "")


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
