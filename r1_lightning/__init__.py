"""r1-lightning: the DeepSeek-R1 training pipeline as PyTorch Lightning modules, data modules and callbacks."""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so `import r1_lightning.rewards` stays light.
_EXPORTS = {
    "PolicySFT": "r1_lightning.modules.sft",
    "GRPO": "r1_lightning.modules.grpo",
    "Distillation": "r1_lightning.modules.distillation",
    "ColdStartDataModule": "r1_lightning.data.cold_start",
    "PromptDataModule": "r1_lightning.data.prompts",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'r1_lightning' has no attribute {name!r}")
