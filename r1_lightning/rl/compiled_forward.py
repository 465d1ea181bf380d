"""Moved to `r1_lightning.engines.compiled_forward`; these names stay importable from here."""

from r1_lightning.engines.compiled_forward import CompiledLayers, compiled_layers, ran_compiled, unsupported_reason

__all__ = ["CompiledLayers", "compiled_layers", "ran_compiled", "unsupported_reason"]
