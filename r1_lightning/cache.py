"""Where r1-lightning keeps what it derives once per machine: ``$R1_LIGHTNING_CACHE``, default ``~/.cache/r1_lightning``.

It holds converted ``.gguf`` models (``policy.gguf_cache_dir``) and the CPU product probes' decisions
(``rl.cpu_matmul.decision_file``); deleting it only costs their first-use work again.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$R1_LIGHTNING_CACHE`` (default ``~/.cache/r1_lightning``)."""
    return Path(os.environ.get("R1_LIGHTNING_CACHE") or Path.home() / ".cache" / "r1_lightning").expanduser()
