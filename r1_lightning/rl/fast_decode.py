"""Moved to `r1_lightning.engines.fast_decode`; these names stay importable from here."""

from r1_lightning.engines.fast_decode import MAX_WEIGHT_BYTES, fast_decode_step, model_unsupported_reason, unsupported_reason

__all__ = ["MAX_WEIGHT_BYTES", "fast_decode_step", "model_unsupported_reason", "unsupported_reason"]
