"""The options of one preprocessing run, and the error raised when they or the input are wrong."""

from __future__ import annotations

from dataclasses import dataclass

from mistral_lightning.errors import UserError


class PreprocessError(UserError):
    """Bad input or options; the message says what to fix."""


@dataclass
class PreprocessConfig:
    input: str
    tokenizer_model: str
    output_prefix: str
    use_fast: bool = True  # False: never read an HF tokenizer.json (--tokenizer-not-use-fast)
    handler_name: str = "GeneralPretrainHandler"  # or "auto": chosen by the first file's columns
    columns: tuple[tuple[str, str], ...] = ()  # --columns: (the format's name, the dataset's name)
    split: str | None = None  # --split of a Hugging Face DatasetDict folder (train when None)
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    seq_length: int | None = None
    overlong: str = "skip"
    workers: int = 1
    log_interval: int = 100
