"""mistral-lightning: Mistral-7B training, conversion, generation and evaluation on Lightning.

Public names are imported lazily, so the CLI's light subcommands do not pay for torch at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "Mistral": "mistral_lightning.model",
    "MistralConfig": "mistral_lightning.config",
    "generate": "mistral_lightning.generation",
}

__all__ = ["Mistral", "MistralConfig", "generate"]

if TYPE_CHECKING:
    from mistral_lightning.config import MistralConfig
    from mistral_lightning.generation import generate
    from mistral_lightning.model import Mistral


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mistral_lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
