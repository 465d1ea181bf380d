"""Moved next to distillation, to `r1_lightning.modules.divergences`; these names stay importable from here."""

from r1_lightning.modules.divergences import (
    DIVERGENCES,
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    chunked_divergence,
    distillation_loss,
    naive_divergence,
    resolve_divergence,
    top_k_log_softmax,
)

__all__ = [
    "DIVERGENCES", "Divergence", "ForwardKL", "GeneralizedJSD", "ReverseKL", "chunked_divergence", "distillation_loss",
    "naive_divergence", "resolve_divergence", "top_k_log_softmax",
]
