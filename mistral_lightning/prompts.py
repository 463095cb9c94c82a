"""Instruction templates: a conversation in, `(input_ids, labels)` out, with prompt tokens labelled -100.

Labels are aligned with `input_ids` (not shifted); the DataModule shifts them for next-token loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mistral_lightning.errors import UserError
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.tokenizer import Tokenizer

# ModelLink's AlpacaTemplate (GeneralInstructionHandler), kept verbatim so datasets match the recipe's.
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. "
    "Please note that you need to think through your response logically and step by step."
)
ALPACA_USER_TOKEN = "### Instruction:"
ALPACA_ASSISTANT_TOKEN = "### Response:"


class TemplateError(UserError):
    """A conversation that the template cannot encode (wrong role order, empty turn, ...)."""


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


def _mistral_turns(messages: Sequence[dict], last_role: str) -> list[tuple[str, str]]:
    """Validate roles and fold a leading system message into the first user turn (as the v1 tokenizer does)."""
    turns = [(str(m.get("role")), m.get("content")) for m in messages]
    system = None
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    if not turns:
        raise TemplateError("conversation has no user message")
    for index, (role, content) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(
                f"message {index + (system is not None)} has role {role!r}, expected {expected!r} "
                "(roles must alternate user/assistant after an optional leading system message)"
            )
        if not isinstance(content, str) or not content:
            raise TemplateError(f"message {index + (system is not None)} ({role}) has no text content")
    if turns[-1][0] != last_role:
        raise TemplateError(f"conversation must end with a {last_role} message, got {turns[-1][0]!r}")
    if system:
        turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
    return turns


def _encode_mistral_turns(tokenizer: Tokenizer, turns: list[tuple[str, str]]) -> TokenizedSample:
    input_ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for role, content in turns:
        if role == "user":
            ids = tokenizer.encode(f"[INST] {content} [/INST]", bos=False)
            labels += [IGNORE_INDEX] * len(ids)
        else:
            ids = tokenizer.encode(content, bos=False, eos=True)
            labels += ids
        input_ids += ids
    return TokenizedSample(input_ids, labels)


def encode_mistral_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> TokenizedSample:
    """`<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>`: loss on every assistant answer and its EOS."""
    return _encode_mistral_turns(tokenizer, _mistral_turns(messages, last_role="assistant"))


def encode_chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids of a conversation ending on a user turn, ready for generation (same as mistral-common v1)."""
    return _encode_mistral_turns(tokenizer, _mistral_turns(messages, last_role="user")).input_ids
