"""Handlers turn rows into the token sequences of each output dataset; they run inside the workers."""

from __future__ import annotations

import abc
import itertools

import numpy as np

from mistral_lightning.data.indexed import LABEL_DTYPE, token_dtype
from mistral_lightning.data.preprocess.chunks import EncodedChunk, RowChunk, RowSkip
from mistral_lightning.data.preprocess.config import PreprocessConfig, PreprocessError
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


class Handler(abc.ABC):
    """Turns rows into token sequences for each output key; `encode` never raises on bad rows."""

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


class PretrainHandler(Handler):
    def __init__(self, tokenizer: Tokenizer, config: PreprocessConfig) -> None:
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
    def encode_row(self, row: dict) -> dict[str, list[int]]:
        instruction = _as_text(row.get("instruction"), "instruction")
        # A missing or null input is the common "no input" case in Alpaca data, not an error.
        input_text = "" if row.get("input") is None else _as_text(row.get("input"), "input")
        output = _as_text(row.get("output"), "output")
        sample = encode_alpaca(self.tokenizer, instruction, input_text, output, self.config.append_eod)
        return {
            "input_ids": sample.input_ids,
            "attention_mask": [1] * len(sample.input_ids),
            "labels": sample.labels,
        }


class MistralHandler(Handler):
    """Chats in the tokenizer's own format (mistral-common's fine-tuning encoding), loss on the answers."""

    def __init__(self, tokenizer: Tokenizer, config: PreprocessConfig) -> None:
        super().__init__(tokenizer, config)
        try:  # a tokenizer without a chat format fails here, before any row is read
            self.chat_format = tokenizer.chat_format
        except ChatFormatError as error:
            raise PreprocessError(f"--handler-name MistralInstructionHandler: {error}") from error

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
        try:
            sample = encode_mistral_chat(self.tokenizer, messages)
        except TemplateError as error:
            raise RowSkip("invalid conversation", str(error)) from None
        # The format already ends every answer with </s>, so --append-eod adds nothing here.
        return {
            "input_ids": sample.input_ids,
            "attention_mask": [1] * len(sample.input_ids),
            "labels": sample.labels,
        }


# Keyed by the --handler-name values ModelLink recipes use.
HANDLER_CLASSES: dict[str, type[Handler]] = {
    "GeneralPretrainHandler": PretrainHandler,
    "GeneralInstructionHandler": AlpacaHandler,
    "MistralInstructionHandler": MistralHandler,
}


def create_handler(config: PreprocessConfig) -> Handler:
    """The handler `config.handler_name` names, with its tokenizer loaded."""
    try:
        tokenizer = Tokenizer(config.tokenizer_model, use_fast=config.use_fast)
    except TokenizerError as error:
        raise PreprocessError(f"--tokenizer-model: {error}") from error
    return HANDLER_CLASSES[config.handler_name](tokenizer, config)
