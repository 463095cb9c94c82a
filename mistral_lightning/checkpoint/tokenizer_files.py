"""The files that make an HF weights folder servable as it is: tokenizer, chat template, generation config.

An export copies them unchanged from the HF folder its weights came from (the folder being converted,
or the `model.pretrained` folder a training run started from), so a server or `transformers` finds the
model's own tokenizer and chat template next to the weights. Weights trained from scratch, which record no
tokenizer, get the one every command assumes for them, Mistral v1 (`scratch_tokenizer`), as `tokenizer.model`
with a `tokenizer_config.json`, where `transformers.AutoTokenizer` and our own loader both look for it.
"""

from __future__ import annotations

import json
import shutil
import sys
from fnmatch import fnmatchcase
from pathlib import Path

from mistral_lightning.config import MistralConfig
from mistral_lightning.tokenizer import SENTENCEPIECE_FILE, Tokenizer, default_tokenizer_path

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# As Mistral publishes them: sentencepiece (tokenizer.model, tokenizer.model.v3), HF fast tokenizers,
# the chat template (in tokenizer_config.json or, from transformers 4.43 on, its own file) and tekken.
TOKENIZER_FILE_PATTERNS = (
    "tokenizer.model*",
    "tokenizer.json",
    TOKENIZER_CONFIG,
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
    """Copy `source`'s companion files byte for byte into `out_dir` (`source`: an HF folder, or the
    `scratch_tokenizer` file, written as `write_sentencepiece` does, with a note); write a
    generation_config.json with the config's BOS/EOS ids when the source has none. Returns the names
    written from the source."""
    copied = []
    if source is not None and source.is_file():
        copied = write_sentencepiece(source, out_dir)
        print(
            "note: these weights were trained from scratch and record no tokenizer; the export gets the "
            f"Mistral v1 tokenizer ({', '.join(copied)}), which every command assumes for them; if the training "
            "data was tokenized with another, put that tokenizer's files there instead",
            file=sys.stderr,
        )
    elif source is not None:
        for path in companion_files(source):
            shutil.copyfile(path, out_dir / path.name)
            copied.append(path.name)
    if GENERATION_CONFIG not in copied:
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        (out_dir / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    return copied


def write_sentencepiece(model_file: Path, out_dir: Path) -> list[str]:
    """A sentencepiece tokenizer as Mistral's v0.1 HF folder holds it: the model as `tokenizer.model` and
    a `tokenizer_config.json` naming its BOS/EOS/UNK pieces with BOS added (without it AutoTokenizer adds
    no BOS, unlike mistral-common and our own loader)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    shutil.copyfile(model_file, out_dir / SENTENCEPIECE_FILE)
    settings = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": processor.id_to_piece(processor.bos_id()),
        "eos_token": processor.id_to_piece(processor.eos_id()),
        "unk_token": processor.id_to_piece(processor.unk_id()),
    }
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return [SENTENCEPIECE_FILE, TOKENIZER_CONFIG]


def scratch_tokenizer(config: MistralConfig) -> Path | None:
    """The tokenizer file for weights trained from scratch, which record none: the one every command assumes
    for them (Mistral v1); None when its ids do not fit the model's vocabulary."""
    default = default_tokenizer_path()
    if Tokenizer(default).vocab_size > config.vocab_size:
        return None  # a toy vocabulary: no shipped tokenizer fits; inference then needs --tokenizer
    return default


__all__ = [
    "COMPANION_PATTERNS",
    "GENERATION_CONFIG",
    "TOKENIZER_FILE_PATTERNS",
    "companion_files",
    "scratch_tokenizer",
    "write_companion_files",
    "write_sentencepiece",
]
