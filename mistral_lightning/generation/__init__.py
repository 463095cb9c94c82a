"""Decoding: a rolling KV cache, sampling, and `generate` (token ids in, new token ids out).

Public names are imported lazily, so the torch-free modules of this package (`options`, for the inference
commands' `--help`) load without torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

_PUBLIC = {
    "GenerationError": "mistral_lightning.generation.sampling",
    "RollingKVCache": "mistral_lightning.generation.kv_cache",
    "next_token_logits": "mistral_lightning.generation.generate",
    "sample_next_tokens": "mistral_lightning.generation.sampling",
    "stream_generate": "mistral_lightning.generation.generate",
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
    from mistral_lightning.generation.generate import generate, next_token_logits, stream_generate
    from mistral_lightning.generation.kv_cache import RollingKVCache
    from mistral_lightning.generation.sampling import GenerationError, sample_next_tokens


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mistral_lightning.generation' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


class _GenerationPackage(types.ModuleType):
    """`mistral_lightning.generation.generate` stays the function, as when it was imported eagerly, although
    the import system binds the `generate` submodule to that name when the submodule loads."""

    @property
    def generate(self):
        return importlib.import_module("mistral_lightning.generation.generate").generate

    @generate.setter
    def generate(self, submodule: types.ModuleType) -> None:
        pass  # the submodule stays reachable in sys.modules


sys.modules[__name__].__class__ = _GenerationPackage
