"""Handlers turn rows into the token sequences of each output dataset; they run inside the workers."""

from __future__ import annotations

import abc
import itertools

import numpy as np

from mistral_lightning.data.indexed import LABEL_DTYPE, token_dtype
from mistral_lightning.data.preprocess.chunks import EncodedChunk, RowChunk, RowSkip
from mistral_lightning.data.preprocess.columns import ColumnMapping
from mistral_lightning.data.preprocess.config import PreprocessConfig, PreprocessError
from mistral_lightning.data.preprocess.preference import (
    PREFERENCE_KEYS,
    SIDES,
    encode_pair,
    fit_pair_length,
    read_pair,
)
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.prompts import TemplateError, encode_alpaca, encode_mistral_chat
from mistral_lightning.tokenizer import ChatFormatError, Tokenizer, TokenizerError

INSTRUCTION_KEYS = ("input_ids", "attention_mask", "labels")


def _as_text(value: object, column: str) -> str:
    """The cell as a string, or raise RowSkip saying why it cannot be used."""
    if value is None:
        raise RowSkip("null or missing field", column)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RowSkip("non-UTF-8 bytes", column) from None
    if not isinstance(value, str):
        raise RowSkip("non-text field", f"{column} is {type(value).__name__}")
    return value


def _describe(label: str, layout: str, names: tuple[str, ...], source) -> str:
    return f"{label} ({layout.format(**{name: source(name) for name in names})})"


class Handler(abc.ABC):
    """Turns rows into token sequences for each output key; `encode` never raises on bad rows."""

    name = ""  # the --handler value
    label = ""  # the format's name in messages
    layout = ""  # the columns it reads, `{name}` standing for each name --columns may map
    columns: tuple[str, ...] = ("instruction", "input", "output")  # the row's columns it reads
    turn_fields: tuple[str, ...] = ()  # names inside each turn of a conversation, mappable too
    signature: frozenset[str] = frozenset()  # columns that mark a file as this format (--handler auto)
    output_keys: tuple[str, ...] = INSTRUCTION_KEYS
    token_keys: tuple[str, ...] = ("input_ids",)

    def __init__(self, tokenizer: Tokenizer, config: PreprocessConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.dtypes = {
            "input_ids": token_dtype(tokenizer.vocab_size),
            "attention_mask": np.uint8,
            "labels": LABEL_DTYPE,
        }
        self.mapping = ColumnMapping(config.columns, self.label, (*self.columns, *self.turn_fields))

    @classmethod
    def describe(cls) -> str:
        """The format and its columns, e.g. "Alpaca (`instruction`, `input`, `output`)"."""
        return _describe(cls.label, cls.layout, (*cls.columns, *cls.turn_fields), str)

    def expected(self) -> str:
        """describe() in the dataset's own names (after --columns)."""
        return _describe(self.label, self.layout, (*self.columns, *self.turn_fields), self.mapping.source)

    def dataset_prefixes(self) -> dict[str, str]:
        """Output dataset prefix per key, named as ModelLink/Megatron name instruction datasets."""
        return {key: f"{self.config.output_prefix}_packed_{key}_document" for key in self.output_keys}

    def required_columns(self, columns: set[str]) -> list[str]:
        """Columns this handler needs that are absent from `columns`."""
        return [name for name in ("instruction", "output") if name not in columns]

    @abc.abstractmethod
    def encode_row(self, row: dict) -> dict[str, list[int]]:
        """The named token lists (input_ids, labels, ...) one row becomes."""

    def encode(self, chunk: RowChunk) -> EncodedChunk:
        samples: list[dict[str, list[int]]] = []
        encoded = EncodedChunk(chunk.origin)
        for index, row in enumerate(chunk.rows):
            try:
                if isinstance(row, RowSkip):  # the reader already found this row unusable
                    raise row
                if self.required_columns(set(row)):
                    raise RowSkip(
                        "unrecognised format", f"expected {self.expected()}, got keys {sorted(row)}"
                    )
                samples.append(self._fit_length(self.encode_row(row), encoded))
            except RowSkip as skip:
                encoded.skipped.append((index, skip))
        for key in self.output_keys:
            sequences = [sample[key] for sample in samples]
            lengths = np.array([len(s) for s in sequences], dtype=np.int64)
            flat = np.fromiter(
                itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum())
            )
            encoded.lengths[key], encoded.flat[key] = lengths, flat.astype(self.dtypes[key])
        encoded.token_count = sum(int(encoded.lengths[key].sum()) for key in self.token_keys)
        return encoded

    def _fit_length(self, sample: dict[str, list[int]], encoded: EncodedChunk) -> dict[str, list[int]]:
        limit = self.config.seq_length
        longest = max(len(ids) for ids in sample.values())
        if limit is None or longest <= limit:
            return sample
        if self.config.overlong == "skip":
            raise RowSkip("longer than --seq-length", f"{longest} > {limit} tokens")
        encoded.truncated += 1
        return {key: ids[:limit] for key, ids in sample.items()}


def _instruction_sample(input_ids: list[int], labels: list[int]) -> dict[str, list[int]]:
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class PretrainHandler(Handler):
    name, label, layout, columns = "text", "plain text", "`{text}`", ("text",)
    signature = frozenset(columns)

    def __init__(self, tokenizer: Tokenizer, config: PreprocessConfig) -> None:
        self.columns = config.json_keys  # before the mapping checks --columns against them
        self.layout = ", ".join(f"`{{{key}}}`" for key in config.json_keys)
        super().__init__(tokenizer, config)
        self.output_keys = self.token_keys = config.json_keys
        self.dtypes = dict.fromkeys(config.json_keys, token_dtype(tokenizer.vocab_size))

    def dataset_prefixes(self) -> dict[str, str]:
        return {key: f"{self.config.output_prefix}_{key}_document" for key in self.output_keys}

    def required_columns(self, columns: set[str]) -> list[str]:
        return [key for key in self.config.json_keys if key not in columns]

    def encode_row(self, row: dict) -> dict[str, list[int]]:
        sample = {}
        for key in self.config.json_keys:
            text = _as_text(row.get(key), key)
            if not text:
                raise RowSkip("empty text", key)
            sample[key] = self.tokenizer.encode(text, bos=True, eos=self.config.append_eod)
        return sample


class AlpacaHandler(Handler):
    name, label, layout = "alpaca", "Alpaca", "`{instruction}`, `{input}`, `{output}`"
    signature = frozenset(("instruction", "output"))

    def encode_row(self, row: dict) -> dict[str, list[int]]:
        instruction = _as_text(row.get("instruction"), "instruction")
        # A missing or null input is the common "no input" case in Alpaca data, not an error.
        input_text = "" if row.get("input") is None else _as_text(row.get("input"), "input")
        output = _as_text(row.get("output"), "output")
        sample = encode_alpaca(self.tokenizer, instruction, input_text, output, self.config.append_eod)
        return _instruction_sample(sample.input_ids, sample.labels)


class PromptCompletionHandler(Handler):
    """Plain-text continuation: BOS, the prompt's ids, then the completion's ids and EOS, which carry the loss.

    The two are tokenized separately so that the loss starts exactly at the completion's first token."""

    name, label, layout = "prompt-completion", "prompt/completion", "`{prompt}`, `{completion}`"
    columns = ("prompt", "completion")
    signature = frozenset(columns)

    def required_columns(self, columns: set[str]) -> list[str]:
        return [name for name in self.columns if name not in columns]

    def encode_row(self, row: dict) -> dict[str, list[int]]:
        prompt = _as_text(row.get("prompt"), "prompt")
        completion = _as_text(row.get("completion"), "completion")
        if not completion.strip():
            raise RowSkip("empty text", "completion")
        prompt_ids = self.tokenizer.encode(prompt, bos=True)
        completion_ids = self.tokenizer.encode(completion, bos=False, eos=True)
        return _instruction_sample(
            prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        )


class MistralHandler(Handler):
    """Chats in the tokenizer's own format (mistral-common's fine-tuning encoding), loss on the answers."""

    name, label = "messages", "OpenAI messages"
    layout = "`{messages}`: list of {{role, content}}; or Alpaca `{instruction}`, `{input}`, `{output}`"
    columns = ("messages", "instruction", "input", "output")
    signature = frozenset(("messages",))

    def __init__(self, tokenizer: Tokenizer, config: PreprocessConfig) -> None:
        super().__init__(tokenizer, config)
        try:  # a tokenizer without a chat format fails here, before any row is read
            self.chat_format = tokenizer.chat_format
        except ChatFormatError as error:
            raise PreprocessError(
                f"--handler {self.name} = --handler-name {config.handler_name}: {error}"
            ) from error

    def required_columns(self, columns: set[str]) -> list[str]:
        return [] if "messages" in columns else super().required_columns(columns)

    def encode_row(self, row: dict) -> dict[str, list[int]]:
        messages = row.get("messages")
        if messages is None:
            instruction = _as_text(row.get("instruction"), "instruction")
            extra = "" if row.get("input") is None else _as_text(row.get("input"), "input")
            user = f"{instruction}\n{extra}" if extra else instruction
            messages = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": _as_text(row.get("output"), "output")},
            ]
        elif not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RowSkip("invalid conversation", "'messages' is not a list of {role, content} objects")
        return self.encode_chat(messages)

    def encode_chat(self, messages: list[dict]) -> dict[str, list[int]]:
        try:
            sample = encode_mistral_chat(self.tokenizer, messages)
        except TemplateError as error:
            raise RowSkip("invalid conversation", str(error)) from None
        # The format already ends every answer with </s>, so --append-eod adds nothing here.
        return _instruction_sample(sample.input_ids, sample.labels)


# ShareGPT's speakers, and the OpenAI names some exports use instead, as chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class ShareGPTHandler(MistralHandler):
    """ShareGPT conversations, encoded as the same chat as `messages` (a `system` column opens it)."""

    name, label = "sharegpt", "ShareGPT"
    layout = "`{conversations}`: list of {{{from}, {value}}}"
    columns, turn_fields = ("conversations", "system"), ("from", "value")
    signature = frozenset(("conversations",))

    def required_columns(self, columns: set[str]) -> list[str]:
        return [] if "conversations" in columns else ["conversations"]

    def encode_row(self, row: dict) -> dict[str, list[int]]:
        speaker, text = self.mapping.source("from"), self.mapping.source("value")
        turns = row.get("conversations")
        if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
            conversations = self.mapping.source("conversations")
            raise RowSkip("invalid conversation", f"'{conversations}' is not a list of {{{speaker}, {text}}}")
        system = row.get("system")
        messages = (
            [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
        )
        for index, turn in enumerate(turns):
            role = SHAREGPT_ROLES.get(turn.get(speaker))
            if role is None:
                raise RowSkip(
                    "invalid conversation",
                    f"turn {index} has {speaker} {turn.get(speaker)!r}; expected one of {', '.join(SHAREGPT_ROLES)}",
                )
            messages.append({"role": role, "content": turn.get(text)})
        return self.encode_chat(messages)


class PreferenceHandler(MistralHandler):
    """Preference pairs for DPO (preference.py reads the row's forms): each side is the prompt conversation and
    one answer in the tokenizer's chat format, labelled on that answer only; four datasets aligned by row."""

    name, label = "preference", "preference pairs"
    layout = (
        "`{prompt}` (text or messages) or `{messages}`, with `{chosen}` and `{rejected}` (text or one assistant "
        "message); or `{chosen}` and `{rejected}` conversations sharing all but their last message"
    )
    columns = ("prompt", "messages", *SIDES)
    signature = frozenset(SIDES)
    output_keys = PREFERENCE_KEYS
    token_keys = tuple(f"{side}_input_ids" for side in SIDES)

    def __init__(self, tokenizer: Tokenizer, config: PreprocessConfig) -> None:
        super().__init__(tokenizer, config)
        ids, labels = token_dtype(tokenizer.vocab_size), LABEL_DTYPE
        self.dtypes = {key: labels if key.endswith("_labels") else ids for key in self.output_keys}

    def required_columns(self, columns: set[str]) -> list[str]:
        return [name for name in SIDES if name not in columns]

    def encode_row(self, row: dict) -> dict[str, list[int]]:
        return encode_pair(self.tokenizer, read_pair(row))

    def _fit_length(self, sample: dict[str, list[int]], encoded: EncodedChunk) -> dict[str, list[int]]:
        if self.config.seq_length is None:
            return sample
        sample, truncated = fit_pair_length(sample, self.config.seq_length, self.config.overlong)
        encoded.truncated += truncated
        return sample


# Keyed by the --handler-name values ModelLink recipes use; --handler takes each class's short name.
HANDLER_CLASSES: dict[str, type[Handler]] = {
    "GeneralPretrainHandler": PretrainHandler,
    "GeneralInstructionHandler": AlpacaHandler,
    "MistralInstructionHandler": MistralHandler,
    "SharegptStyleInstructionHandler": ShareGPTHandler,
    "PromptCompletionHandler": PromptCompletionHandler,
    "PreferencePairwiseHandler": PreferenceHandler,
}
FORMATS: dict[str, str] = {cls.name: handler_name for handler_name, cls in HANDLER_CLASSES.items()}
# --handler auto tries these in order: the first whose signature columns a file has.
DETECTION_ORDER = (
    PreferenceHandler,
    ShareGPTHandler,
    MistralHandler,
    PromptCompletionHandler,
    AlpacaHandler,
    PretrainHandler,
)


def create_handler(config: PreprocessConfig) -> Handler:
    """The handler `config.handler_name` names, with its tokenizer loaded."""
    try:
        tokenizer = Tokenizer(config.tokenizer_model, use_fast=config.use_fast)
    except TokenizerError as error:
        raise PreprocessError(f"--tokenizer-model: {error}") from error
    return HANDLER_CLASSES[config.handler_name](tokenizer, config)
