"""Lightning's progress bars with the numbers an R1 run needs: learning rates readable, no meaningless fields."""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from typing_extensions import override


def readable_metrics(items: dict[str, Any]) -> dict[str, Any]:
    """Progress-bar items as a reader wants them.

    A learning rate (``lr``, ``lr-AdamW`` ...) in scientific notation (``1.00e-04``, where a fixed
    3 decimals show ``0.000``); ``v_num`` dropped when the logger's version is a name, which the bar
    would cut to its last 4 characters (``latest`` → ``test``).

    >>> readable_metrics({"lr": 0.0001, "v_num": "latest", "train/reward": 0.5})
    {'lr': '1.00e-04', 'train/reward': 0.5}
    """
    shown = {}
    for name, value in items.items():
        if name == "v_num" and isinstance(value, str):
            continue
        is_rate = name == "lr" or name.startswith(("lr-", "lr/", "lr_")) or name.endswith("/lr")
        shown[name] = f"{value:.2e}" if is_rate and isinstance(value, (int, float)) else value
    return shown


class R1RichProgressBar(RichProgressBar):
    """``RichProgressBar`` with ``readable_metrics`` and ``Epoch N`` alone when the run is bounded by steps
    (Lightning writes ``Epoch N/{max_epochs - 1}``, ``Epoch 0/-2`` for ``max_epochs=-1``).

    Example:
        >>> trainer = L.Trainer(callbacks=[R1RichProgressBar()])
    """

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return readable_metrics(super().get_metrics(trainer, pl_module))

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's method, overridden
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "")
        return description


class R1TQDMProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` with ``readable_metrics`` (Lightning's choice when ``rich`` is not installed).

    Example:
        >>> trainer = L.Trainer(callbacks=[R1TQDMProgressBar()])
    """

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return readable_metrics(super().get_metrics(trainer, pl_module))


def default_progress_bar() -> ProgressBar:
    """The bar Lightning would pick (rich if installed, else tqdm), with readable metrics."""
    return R1RichProgressBar() if importlib.util.find_spec("rich") is not None else R1TQDMProgressBar()
