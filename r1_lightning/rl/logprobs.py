"""Moved to `r1_lightning.engines.logprobs`; these names stay importable from here."""

from r1_lightning.engines.logprobs import chunked_token_logprobs, length_buckets, selective_log_softmax, shared_prefix_hidden

__all__ = ["chunked_token_logprobs", "length_buckets", "selective_log_softmax", "shared_prefix_hidden"]
