"""Decoding: a rolling KV cache, sampling, and `generate` (token ids in, new token ids out)."""

from mistral_lightning.generation.generate import generate, next_token_logits, stream_generate
from mistral_lightning.generation.kv_cache import RollingKVCache
from mistral_lightning.generation.sampling import GenerationError, sample_next_tokens

__all__ = [
    "GenerationError",
    "RollingKVCache",
    "generate",
    "next_token_logits",
    "sample_next_tokens",
    "stream_generate",
]
