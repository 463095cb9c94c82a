"""mistral-lightning: Mistral-7B training, conversion, generation and evaluation on Lightning."""

from mistral_lightning.config import MistralConfig
from mistral_lightning.model import Mistral

__all__ = ["Mistral", "MistralConfig"]
