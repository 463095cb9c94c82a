"""The one tokenizer of the product: a thin wrapper over a sentencepiece `.model` file.

Mistral's HF folders ship the same sentencepiece model as `tokenizer.model`; the slow HF tokenizer
(`--tokenizer-not-use-fast` in the recipe) is sentencepiece plus BOS, so encoding here gives the same ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm

from mistral_lightning.errors import UserError

HF_TOKENIZER_FILE = "tokenizer.model"


class TokenizerError(UserError):
    """The tokenizer path a user gave cannot be loaded."""


def default_tokenizer_path() -> Path | None:
    """The Mistral v1 sentencepiece model shipped inside `mistral-common`, if that package is installed."""
    try:
        import mistral_common
    except ImportError:
        return None
    path = Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """A `.model` file as given, or `<folder>/tokenizer.model` for an HF model folder."""
    path = Path(path)
    if path.is_dir():
        candidate = path / HF_TOKENIZER_FILE
        if not candidate.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
            raise TokenizerError(
                f"tokenizer folder {path} has no {HF_TOKENIZER_FILE} (found: {found}); point at the "
                f"sentencepiece .model file or at an HF model folder that holds {HF_TOKENIZER_FILE}"
            )
        return candidate
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {path} does not exist; give a sentencepiece .model file or an HF folder "
            f"holding {HF_TOKENIZER_FILE}"
        )
    return path


class Tokenizer:
    """Sentencepiece encode/decode with explicit BOS/EOS control."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_tokenizer_file(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{self.path} is not a sentencepiece model: {error}") from error
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.vocab_size: int = self._sp.vocab_size()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"sentencepiece model {self.path} defines no BOS/EOS token; Mistral needs both"
            )

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self._sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
