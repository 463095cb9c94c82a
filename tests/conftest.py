"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

from mistral_lightning.tokenizer import Tokenizer, default_tokenizer_path


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    """The real Mistral v1 sentencepiece model shipped in mistral-common (a test dependency)."""
    path = default_tokenizer_path()
    assert path is not None, "mistral-common is needed for the tests: pip install -e '.[test]'"
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path: str) -> Tokenizer:
    return Tokenizer(tokenizer_path)
