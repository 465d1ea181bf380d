"""``R1CLI``: LightningCLI with the project's defaults, the one class behind ``r1-lightning fit/validate/test/predict``
and every stage of ``r1-lightning recipe`` (``r1_lightning.cli`` is the command; this module the CLI it runs).

Model and data are picked by ``class_path`` (any LightningModule / LightningDataModule, including the
user's own). Besides LightningCLI's behaviour: a checkpoint never changes the configuration, SIGTERM /
Ctrl-C save the step reached, a fresh fit refuses an earlier run's checkpoint directory, and validate /
test / predict save ``<subcommand>_config.yaml`` (README, "Failure behaviour").
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from typing_extensions import override

from r1_lightning.callbacks.preemption import PreemptionCheckpoint
from r1_lightning.callbacks.progress import default_progress_bar
from r1_lightning.checkpoint import (
    AtomicCheckpointIO,
    ConfigOverCheckpoint,
    FreshRunCheck,
    load_checkpoint_file,
    require_lightning_checkpoint,
    resolve_checkpoint,
)

DESCRIPTION = (
    "The R1 pipeline's stages as Lightning runs. Subcommands: fit, validate, test, predict (below), and "
    "`r1-lightning recipe FILE [--output_dir DIR] [--fresh]`, which runs a multi-stage recipe (`r1-lightning recipe --help`)."
)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


# Warnings every run printed that say nothing about the user's run (Lightning's own deprecated call into torch).
KNOWN_HARMLESS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
MANUAL_CHECKPOINT_WARNING = r"Using ModelCheckpoint with manual optimization and every_n_train_steps"


class QuietKnownWarnings(Callback):
    """Silence Lightning's "modules in eval mode" warning when every such module is frozen (GRPO's reference,
    distillation's teacher), and its manual-optimization checkpoint warning for modules that checkpoint after
    the step by design, so that a warning that matters stands out. Any other eval-mode module still warns."""

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        in_eval = [m for m in pl_module.modules() if not m.training]
        if in_eval and all(not p.requires_grad for m in in_eval for p in m.parameters()):
            warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)
        if not pl_module.automatic_optimization:
            warnings.filterwarnings("ignore", message=MANUAL_CHECKPOINT_WARNING)


class R1CLI(LightningCLI):
    """LightningCLI with subclass mode for model and data and the project's defaults."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        for message in KNOWN_HARMLESS:
            warnings.filterwarnings("ignore", message=message)
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # each module configures its own AdamW + schedule
            save_config_kwargs={"overwrite": True},
            # `main` prints a parse error as one line; `recipe` is not a LightningCLI subcommand, so the help names it.
            parser_kwargs={"exit_on_error": False, "prog": "r1-lightning", "description": DESCRIPTION},
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # An explicit ckpt_path is checked at once: a missing, corrupt or non-Lightning file is one line, before any loading.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", "best", "hpc"):
            require_lightning_checkpoint(ckpt_path, load_checkpoint_file(ckpt_path, mmap=True))

    def _parse_ckpt_path(self) -> None:
        """Keep the parsed config: LightningCLI would merge an explicit checkpoint's saved hyper-parameters over it.

        That merge let a checkpoint change the module class, turn on ``trust_remote_code``, change a
        loaded path or override a command-line value, and only for ``--ckpt_path FILE`` (not ``last``).
        Here the config and command line always win, for both forms; the checkpoint restores state
        only, and ``check_checkpoint_fits`` refuses one of another class or shape when it loads.
        """

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        # Atomic checkpoint writes and weights_only loads, unless the config names its own CheckpointIO.
        plugins = _as_list(trainer_config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        self.fresh_run_check = FreshRunCheck()
        configured = _as_list(trainer_config.get("callbacks"))
        callbacks = [self.fresh_run_check, ConfigOverCheckpoint(), PreemptionCheckpoint(), QuietKnownWarnings()]
        if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks.append(default_progress_bar())
        kwargs["callbacks"] = [*configured, *callbacks]  # before SaveConfigCallback
        # validate / test / predict save their config beside a fit's config.yaml, not over it.
        filename = "config.yaml" if self.subcommand in (None, "fit") else f"{self.subcommand}_config.yaml"
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": filename}
        return super().instantiate_trainer(**kwargs)

    def fit(self, model: L.LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """``trainer.fit`` with ``ckpt_path`` checked, and ``last`` = the newest checkpoint that loads."""
        self.fresh_run_check.resuming = ckpt_path is not None
        self.trainer.fit(model, ckpt_path=resolve_checkpoint(self.trainer, ckpt_path), **kwargs)


def _as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]
