"""Independent references for tokenizers: mistral-common for every tokenizer it ships (a chat's ids, and
which of them are answers), and transformers' converter for an HF tokenizer.json.

The answer mask follows the rule of the format, not our code: the tokens after each `[/INST]` (a control
token from v2 on, text in v1), up to and including the EOS that closes the answer.
"""

from __future__ import annotations

import shutil
import tempfile
from functools import cache
from pathlib import Path

import mistral_common
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

DATA = Path(mistral_common.__file__).parent / "data"
# Every format mistral-common ships: sentencepiece v1 (Mistral-7B v0.1/v0.2), v2, v3 (7B v0.3), v7, tekken (NeMo).
SHIPPED = {
    "v1": DATA / "tokenizer.model.v1",
    "v2": DATA / "mistral_instruct_tokenizer_240216.model.v2",
    "v3": DATA / "mistral_instruct_tokenizer_240323.model.v3",
    "v7": DATA / "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": DATA / "tekken_240718.json",
}
# A system message, several turns, Chinese, emoji and a trailing space (v2 and later strip it from answers).
CONVERSATION = [
    {"role": "system", "content": "You answer briefly. 你是一个助手。"},
    {"role": "user", "content": "Translate 'cat' into Chinese 🐱"},
    {"role": "assistant", "content": "猫 🐈 "},
    {"role": "user", "content": "And 'dog'?\nOne word."},
    {"role": "assistant", "content": "狗"},
]
MESSAGE_TYPES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


@cache
def reference(name: str, mode: ValidationMode = ValidationMode.test) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(SHIPPED[name]), mode=mode)


def request(messages: list[dict]) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[MESSAGE_TYPES[m["role"]](content=m["content"]) for m in messages])


def finetuning_ids(name: str, messages: list[dict]) -> list[int]:
    """mistral-common's fine-tuning encoding of a conversation that ends with an answer."""
    return reference(name, ValidationMode.finetuning).encode_chat_completion(request(messages)).tokens


def prompt_ids(name: str, messages: list[dict]) -> list[int]:
    """mistral-common's encoding of a conversation that ends on a user turn, as a prompt."""
    return reference(name).encode_chat_completion(request(messages)).tokens


def answer_labels(name: str, ids: list[int], ignore_index: int = -100) -> list[int]:
    """`ids` where they belong to an answer (after `[/INST]`, through its EOS), `ignore_index` elsewhere."""
    tokenizer = reference(name)
    eos = tokenizer.instruct_tokenizer.tokenizer.eos_id
    labels, in_answer = [], False
    for position, token in enumerate(ids):
        labels.append(token if in_answer else ignore_index)
        if token == eos:
            in_answer = False
        elif tokenizer.decode(ids[: position + 1], SpecialTokenPolicy.KEEP).endswith("[/INST]"):
            in_answer = True
    return labels


def last_answer_labels(name: str, ids: list[int], ignore_index: int = -100) -> list[int]:
    """`answer_labels` of a conversation ending with an answer, keeping only that last answer: what a side of a
    preference pair is labelled on."""
    labels = answer_labels(name, ids, ignore_index)
    start = max(position for position, label in enumerate(labels) if label == ignore_index) + 1
    return [ignore_index] * start + labels[start:]


def write_tokenizer_json_only(folder: Path) -> Path:
    """An HF folder holding only tokenizer.json, converted from the v1 sentencepiece model by transformers."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        source, converted = Path(scratch, "source"), Path(scratch, "converted")
        source.mkdir()
        shutil.copy(SHIPPED["v1"], source / "tokenizer.model")
        LlamaTokenizer.from_pretrained(source).save_pretrained(converted)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(converted / "tokenizer.json", folder / "tokenizer.json")
    return folder
