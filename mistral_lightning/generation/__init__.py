"""Decoding: a rolling KV cache, sampling, and `generate` (token ids in, new token ids out).

Public names are imported lazily, so the torch-free modules of this package (`text_stream`,
`predict_writer`) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "generate": "mistral_lightning.generation.decoding",
    "GenerationError": "mistral_lightning.generation.sampling",
    "RollingKVCache": "mistral_lightning.generation.kv_cache",
    "next_token_logits": "mistral_lightning.generation.decoding",
    "sample_next_tokens": "mistral_lightning.generation.sampling",
    "stream_generate": "mistral_lightning.generation.decoding",
}

__all__ = [
    "GenerationError",
    "RollingKVCache",
    "generate",
    "next_token_logits",
    "sample_next_tokens",
    "stream_generate",
]

if TYPE_CHECKING:
    from mistral_lightning.generation.decoding import generate, next_token_logits, stream_generate
    from mistral_lightning.generation.kv_cache import RollingKVCache
    from mistral_lightning.generation.sampling import GenerationError, sample_next_tokens


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mistral_lightning.generation' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
