"""The files that make an HF weights folder servable as it is: tokenizer, chat template, generation config.

An export copies them unchanged from the HF folder its weights came from (the folder being converted,
or the `model.pretrained` folder a training run started from), so a server or `transformers` finds the
model's own tokenizer and chat template next to the weights.
"""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatchcase
from pathlib import Path

from mistral_lightning.config import MistralConfig

GENERATION_CONFIG = "generation_config.json"
# As Mistral publishes them: sentencepiece (tokenizer.model, tokenizer.model.v3), HF fast tokenizers,
# the chat template (in tokenizer_config.json or, from transformers 4.43 on, its own file) and tekken.
TOKENIZER_FILE_PATTERNS = (
    "tokenizer.model*",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tekken.json",
    "chat_template.jinja",
    "chat_template.json",
)
COMPANION_PATTERNS = (*TOKENIZER_FILE_PATTERNS, GENERATION_CONFIG)


def companion_files(folder: Path) -> list[Path]:
    """The tokenizer, chat-template and generation files directly inside `folder`, by name."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and any(fnmatchcase(path.name, pattern) for pattern in COMPANION_PATTERNS)
    )


def write_companion_files(source: Path | None, config: MistralConfig, out_dir: Path) -> list[str]:
    """Copy `source`'s companion files byte for byte into `out_dir`; write a generation_config.json with
    the config's BOS/EOS ids when the source has none. Returns the copied names."""
    copied = []
    if source is not None:
        for path in companion_files(source):
            shutil.copyfile(path, out_dir / path.name)
            copied.append(path.name)
    if GENERATION_CONFIG not in copied:
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        (out_dir / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    return copied


__all__ = [
    "COMPANION_PATTERNS",
    "GENERATION_CONFIG",
    "TOKENIZER_FILE_PATTERNS",
    "companion_files",
    "write_companion_files",
]
