"""Instruction templates: a conversation in, `(input_ids, labels)` out, with prompt tokens labelled -100.

The Alpaca template is ModelLink's text; Mistral chats are encoded by the tokenizer's own format
(mistral-common), never by hand-written `[INST]` strings.

Labels are aligned with `input_ids` (not shifted); the DataModule shifts them for next-token loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.tokenizer import TemplateError, Tokenizer

__all__ = [
    "TemplateError",
    "TokenizedSample",
    "alpaca_prompt",
    "encode_alpaca",
    "encode_chat_prompt",
    "encode_mistral_chat",
]

# ModelLink's AlpacaTemplate (GeneralInstructionHandler), kept verbatim so datasets match the recipe's.
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. "
    "Please note that you need to think through your response logically and step by step."
)
ALPACA_USER_TOKEN = "### Instruction:"
ALPACA_ASSISTANT_TOKEN = "### Response:"


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """Everything up to and including the response header; the model continues from here."""
    # ModelLink joins instruction and input with "\n" even when the input is empty.
    user = f"{instruction}\n{input_text}"
    return f"\n{ALPACA_SYSTEM}\n{ALPACA_USER_TOKEN}\n{user}\n{ALPACA_ASSISTANT_TOKEN}\n"


def encode_alpaca(
    tokenizer: Tokenizer, instruction: str, input_text: str, output: str, append_eod: bool
) -> TokenizedSample:
    prompt = alpaca_prompt(instruction, input_text)
    # Tokenize the whole text at once, as ModelLink does, and mask as many tokens as the prompt alone has.
    input_ids = tokenizer.encode(f"{prompt}{output}\n", bos=True)
    prompt_length = len(tokenizer.encode(prompt, bos=True))
    labels = [IGNORE_INDEX] * prompt_length + input_ids[prompt_length:]
    if append_eod:
        input_ids.append(tokenizer.eos_id)
        labels.append(tokenizer.eos_id)
    return TokenizedSample(input_ids, labels)


def encode_mistral_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> TokenizedSample:
    """mistral-common's fine-tuning ids of a conversation ending with an answer; the loss covers every
    answer (its tokens after [/INST] and the EOS that closes it), nothing else."""
    encoded = tokenizer.encode_chat(messages, training=True)
    labels = [IGNORE_INDEX] * len(encoded.ids)
    for start, end in encoded.answers:
        labels[start:end] = encoded.ids[start:end]
    return TokenizedSample(encoded.ids, labels)


def encode_chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """mistral-common's ids of a conversation ending on a user turn, ready for generation."""
    return tokenizer.encode_chat(messages, training=False).ids
