"""Every Mistral tokenizer behind one interface.

Sentencepiece v1, v2, v3, v7 and tekken files are read by mistral-common, which also owns their chat
formats (`[INST]` as text or as control tokens, where the system prompt goes); an HF folder that holds only
`tokenizer.json` is read by the `tokenizers` library and encodes plain text only, since its format is
described by nothing but a Jinja chat template. Plain text is `BOS + ids [+ EOS]` for all of them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_lightning.errors import UserError

TEKKEN_FILE = "tekken.json"
SENTENCEPIECE_FILE = "tokenizer.model"
HF_JSON_FILE = "tokenizer.json"
# tokenizer.model.v3, tokenizer.model.v7m1, ...: mistral-common reads the format version from the suffix.
_VERSIONED_MODEL = re.compile(r"\.model\.v(\d+)(m\d+)?$")
CHAT_ROLES = ("system", "user", "assistant")


class TokenizerError(UserError):
    """The tokenizer a user pointed at cannot be found, loaded or used for this model."""


class ChatFormatError(TokenizerError):
    """The tokenizer has no chat format that mistral-common knows, so chats cannot be encoded with it."""


class TemplateError(UserError):
    """A conversation that the tokenizer's chat format cannot encode (wrong role order, empty turn, ...)."""


# Names for the tokenizers mistral-common ships, accepted wherever a tokenizer file is (a path that exists
# wins); each is the file behind mistral-common's MistralTokenizer.v1(), .v2(), .v3(), .v7(), .v3(is_tekken=True).
SHIPPED_TOKENIZERS = {
    "mistral-v1": "tokenizer.model.v1",  # Mistral-7B v0.1 / v0.2
    "mistral-v2": "mistral_instruct_tokenizer_240216.model.v2",
    "mistral-v3": "mistral_instruct_tokenizer_240323.model.v3",  # Mistral-7B v0.3
    "mistral-v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": "tekken_240718.json",  # Mistral NeMo
}
DEFAULT_TOKENIZER = "mistral-v1"


def shipped_tokenizer_path(name: str) -> Path:
    """The file inside mistral-common behind one of SHIPPED_TOKENIZERS' names."""
    import mistral_common

    return Path(os.path.dirname(mistral_common.__file__)) / "data" / SHIPPED_TOKENIZERS[name]


def default_tokenizer_path() -> Path:
    """The file of DEFAULT_TOKENIZER (Mistral's v1 sentencepiece model): the tokenizer of Mistral-7B v0.1/v0.2."""
    return shipped_tokenizer_path(DEFAULT_TOKENIZER)


def resolve_tokenizer_name(path: str | os.PathLike) -> Path:
    """`path` itself, or the shipped file a name such as `mistral-v3` stands for when no such path exists."""
    if str(path) in SHIPPED_TOKENIZERS and not Path(path).exists():
        return shipped_tokenizer_path(str(path))
    return Path(path)


def _versioned_models(folder: Path) -> list[Path]:
    """The folder's tokenizer.model.vN files, newest format first."""
    found = [(m, p) for p in folder.iterdir() if p.is_file() and (m := _VERSIONED_MODEL.search(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: (-int(mp[0].group(1)), mp[1].name))]


def tokenizer_files(folder: Path, *, use_fast: bool = True) -> list[Path]:
    """The tokenizer files of an HF model folder, the one to use first.

    Mistral's own files come first (tekken.json, tokenizer.model.vN, tokenizer.model), since they define
    the chat format; tokenizer.json (the fast tokenizer) last, and only with `use_fast`.
    """
    candidates = [folder / TEKKEN_FILE, *_versioned_models(folder), folder / SENTENCEPIECE_FILE]
    if use_fast:
        candidates.append(folder / HF_JSON_FILE)
    return [candidate for candidate in candidates if candidate.is_file()]


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and bool(tokenizer_files(folder))


def find_tokenizer_file(path: str | os.PathLike, *, use_fast: bool = True) -> Path:
    """The tokenizer file `path` names: the file itself, the first of an HF model folder's `tokenizer_files`, or
    the file of a shipped tokenizer's name (`mistral-v1`, `mistral-v3`, `tekken`, ...)."""
    path = resolve_tokenizer_name(path)
    if path.is_dir():
        found = tokenizer_files(path, use_fast=use_fast)
        if found:
            return found[0]
        if (path / HF_JSON_FILE).is_file():
            raise TokenizerError(
                f"tokenizer folder {path} holds only {HF_JSON_FILE}, the fast tokenizer, which "
                "--tokenizer-not-use-fast excludes; drop that option or add Mistral's tokenizer.model"
            )
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
        raise TokenizerError(
            f"tokenizer folder {path} has no tokenizer (looked for {TEKKEN_FILE}, {SENTENCEPIECE_FILE}.vN, "
            f"{SENTENCEPIECE_FILE}, {HF_JSON_FILE}; found: {listing}); point at the model's HF folder or its "
            "tokenizer file"
        )
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {path} does not exist; give a tokenizer file ({SENTENCEPIECE_FILE}[.vN], "
            f"tekken*.json, {HF_JSON_FILE}), an HF model folder holding one, or the name of one mistral-common "
            f"ships: {', '.join(SHIPPED_TOKENIZERS)}"
        )
    if _file_kind(path) is None:
        raise TokenizerError(
            f"unknown tokenizer file {path}: expected a sentencepiece {SENTENCEPIECE_FILE} or .model.vN "
            f"file, a tekken*.json file or an HF {HF_JSON_FILE}"
        )
    if _file_kind(path) == "hf-json" and not use_fast:
        raise TokenizerError(f"{path} is the fast tokenizer, which --tokenizer-not-use-fast excludes")
    return path


def _file_kind(path: Path) -> str | None:
    """The kind of tokenizer file (tekken, sentencepiece, hf-json) by its name, as mistral-common tells them."""
    if path.suffix == ".json":
        return "tekken" if "tekken" in path.name else "hf-json"
    if path.name.endswith(".model") or _VERSIONED_MODEL.search(path.name):
        return "sentencepiece"
    return None


class _HFJsonTokenizer:
    """An HF `tokenizer.json` through the `tokenizers` library, with mistral-common's text-tokenizer methods."""

    def __init__(self, path: Path) -> None:
        import tokenizers

        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises its own Exception type
            raise TokenizerError(f"{path} is not a valid HF {HF_JSON_FILE}: {error}") from error
        self.n_words: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        bos, eos = _special_token_names(path.parent)
        self.bos_id, self.eos_id = self._tokenizer.token_to_id(bos), self._tokenizer.token_to_id(eos)
        if self.bos_id is None or self.eos_id is None:
            raise TokenizerError(
                f"{path} has no token {bos!r} or {eos!r}; Mistral needs BOS and EOS (name them as bos_token "
                "and eos_token in tokenizer_config.json)"
            )

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def _special_token_names(folder: Path) -> tuple[str, str]:
    """BOS and EOS as the folder's tokenizer_config.json or special_tokens_map.json name them; <s>, </s> else."""
    names = {"bos_token": "<s>", "eos_token": "</s>"}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            settings = json.loads((folder / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in names:
            value = settings.get(key) if isinstance(settings, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return names["bos_token"], names["eos_token"]


@dataclass(frozen=True)
class EncodedChat:
    """A conversation's ids and the [start, end) span of each assistant answer (its text and closing EOS)."""

    ids: list[int]
    answers: list[tuple[int, int]]


class Tokenizer:
    """Encode and decode with any Mistral tokenizer, from its file or its HF model folder.

    `use_fast=False` (the recipe's --tokenizer-not-use-fast) never reads tokenizer.json.
    """

    def __init__(self, path: str | os.PathLike, *, use_fast: bool = True) -> None:
        self.path = find_tokenizer_file(path, use_fast=use_fast)
        self.kind = _file_kind(self.path)
        self._encoders: dict[str, Any] = {}  # mistral-common tokenizers by validation mode, loaded when used
        if self.kind == "hf-json":
            self._text: Any = _HFJsonTokenizer(self.path)
        else:
            self._text = self._mistral_common("test").instruct_tokenizer.tokenizer
        self.bos_id: int = self._text.bos_id
        self.eos_id: int = self._text.eos_id
        self.vocab_size: int = self._text.n_words

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._text.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._text.decode([int(i) for i in ids])

    def check_fits(self, vocab_size: int, model: str | os.PathLike) -> None:
        """Refuse a tokenizer whose ids the model's embedding table cannot hold."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(
                f"tokenizer {self.path} has {self.vocab_size} tokens but the model {model} has a vocabulary "
                f"of {vocab_size}; use the model's own tokenizer (--tokenizer)"
            )

    # ------------------------------------------------------------------ chat formats
    @property
    def chat_format(self) -> str:
        """The name of the chat format, e.g. "mistral-common v3 (sentencepiece)"; raises ChatFormatError if none."""
        if self.kind == "hf-json":
            raise ChatFormatError(
                f"{self.path}: with only {HF_JSON_FILE}, the chat format is described by nothing but the Jinja "
                "chat template in tokenizer_config.json, which mistral-lightning does not guess from; use the "
                f"model's Mistral tokenizer file ({SENTENCEPIECE_FILE}.vN, {TEKKEN_FILE} or {SENTENCEPIECE_FILE})"
            )
        version = self._text.version
        if version.value == "v1" and self._text.is_special("[INST]"):
            raise ChatFormatError(
                f"{self.path} has [INST] control tokens but no version in its name, so its chat format (v2, v3 "
                f"or v7) is unknown; point at the versioned file beside it ({SENTENCEPIECE_FILE}.v3, ...)"
            )
        return f"mistral-common {version.value} ({self.kind})"

    def encode_chat(self, messages: Sequence[dict], *, training: bool) -> EncodedChat:
        """mistral-common's ids for a conversation of {role, content} dicts.

        training: the fine-tuning encoding (ValidationMode.finetuning; the conversation ends with an
        answer). Otherwise a prompt for generation (it ends with a user turn).
        """
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        chat_format = self.chat_format
        types = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        _check_messages(messages)
        typed = [types[m["role"]](content=m["content"]) for m in messages]
        encoder = self._mistral_common("finetuning" if training else "test")
        try:
            ids = encoder.encode_chat_completion(ChatCompletionRequest(messages=typed)).tokens
        except (MistralCommonException, ValueError, AssertionError, NotImplementedError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TemplateError(f"{chat_format} cannot encode this conversation: {reason}") from None
        if not training:
            return EncodedChat(ids, [])
        return EncodedChat(ids, _answer_spans(encoder, typed, ids, chat_format))

    def _mistral_common(self, mode: str) -> Any:
        """mistral-common's MistralTokenizer for this file, validating requests as `mode` says."""
        if mode not in self._encoders:
            from mistral_common.exceptions import MistralCommonException
            from mistral_common.protocol.instruct.validator import ValidationMode
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

            try:
                self._encoders[mode] = MistralTokenizer.from_file(self.path, mode=ValidationMode(mode))
            except (
                MistralCommonException,
                OSError,
                RuntimeError,
                ValueError,
                KeyError,
                AssertionError,
            ) as error:
                raise TokenizerError(f"{self.path} is not a valid {self.kind} tokenizer: {error}") from error
        return self._encoders[mode]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _answer_spans(encoder: Any, typed: list, ids: list[int], chat_format: str) -> list[tuple[int, int]]:
    """Each answer ends at its EOS (no text encodes to EOS) and is as long as mistral-common encodes it."""
    eos_id = encoder.instruct_tokenizer.tokenizer.eos_id
    ends = [position + 1 for position, token in enumerate(ids) if token == eos_id]
    last_user = max((i for i, m in enumerate(typed) if m.role == "user"), default=-1)
    answers = [(i, m) for i, m in enumerate(typed) if m.role == "assistant"]
    if len(ends) != len(answers):
        raise TemplateError(f"{chat_format} closes {len(ends)} turns with EOS for {len(answers)} answers")
    spans = []
    for end, (index, message) in zip(ends, answers):
        tokens = encoder.instruct_tokenizer.encode_assistant_message(message, index < last_user)
        if ids[end - len(tokens) : end] != tokens:
            raise TemplateError(f"{chat_format} encodes message {index} differently within the conversation")
        spans.append((end - len(tokens), end))
    return spans


def _check_messages(messages: Sequence[dict]) -> None:
    """What mistral-common's own checks would report less clearly: unknown roles, empty text, answers in a row."""
    if not messages:
        raise TemplateError("conversation has no messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise TemplateError(f"message {index} has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise TemplateError(f"message {index} ({message['role']}) has no text content")
        if index and message["role"] == "assistant" and messages[index - 1].get("role") == "assistant":
            raise TemplateError(f"messages {index - 1} and {index} are both assistant answers; merge them")
