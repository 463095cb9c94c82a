"""Preference pairs (DPO data): a row's prompt conversation and its chosen and rejected answers, each side encoded.

Rows come in TRL's and axolotl's layouts:
  explicit  `prompt` (text: one user turn; or a list of {role, content} ending on a user turn) or `messages` (the
            prompt conversation), with `chosen` and `rejected` each text or a list of one assistant message;
  implicit  `chosen` and `rejected` whole conversations that share every message but their last (assistant) one,
            which is the answer: the shared messages are the prompt. As TRL does, a row is read so whenever both
            sides are conversations of more than one message (a `prompt` column beside them, such as
            UltraFeedback's, is then not read).
Each side is mistral-common's fine-tuning encoding of the prompt conversation plus that side's answer; its labels
are the ids of that last answer (its tokens and the EOS closing it) and -100 everywhere else, on the earlier
answers of a multi-turn prompt too. Both sides' prompt ids are the same, position for position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mistral_lightning.data.preprocess.chunks import RowSkip
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.tokenizer import TemplateError, Tokenizer

SIDES = ("chosen", "rejected")
PREFERENCE_KEYS = tuple(f"{side}_{key}" for side in SIDES for key in ("input_ids", "labels"))


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]  # {role, content} messages ending on a user turn
    chosen: str
    rejected: str


def read_pair(row: dict) -> PreferencePair:
    """The row's prompt conversation and two answers, in whichever form it holds them; RowSkip says why not."""
    chosen, rejected = (_present(row.get(side), side) for side in SIDES)
    prompt = row.get("prompt") if row.get("prompt") is not None else row.get("messages")
    if _is_conversation(chosen) and _is_conversation(rejected) and len(chosen) > 1 and len(rejected) > 1:
        return _implicit_pair(chosen, rejected)
    if prompt is None:
        detail = "prompt (or messages); without one, chosen and rejected must be conversations sharing it"
        raise RowSkip("null or missing field", detail)
    return PreferencePair(_prompt_messages(prompt), _answer(chosen, "chosen"), _answer(rejected, "rejected"))


def _present(value: object, column: str) -> object:
    if value is None:
        raise RowSkip("null or missing field", column)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise RowSkip("non-UTF-8 bytes", column) from None
    return value


def _is_conversation(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(message, dict) for message in value)


def _prompt_messages(prompt: object) -> list[dict]:
    prompt = _present(prompt, "prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowSkip("empty text", "prompt")
        return [{"role": "user", "content": prompt}]
    if not _is_conversation(prompt) or not prompt:
        raise RowSkip(
            "invalid conversation", "the prompt is neither text nor a list of {role, content} objects"
        )
    if prompt[-1].get("role") != "user":
        raise RowSkip(
            "invalid conversation", f"the prompt ends on a {prompt[-1].get('role')!r} turn, not a user one"
        )
    return prompt


def _answer(value: object, side: str) -> str:
    """Text, or the text of the one assistant message of a list (TRL's conversational form)."""
    value = _present(value, side)
    if _is_conversation(value) and len(value) == 1 and value[0].get("role") == "assistant":
        value = _present(value[0].get("content"), f"{side} content")
    elif isinstance(value, list):
        raise RowSkip("invalid answer", f"{side} must be text or a list of one assistant message")
    if not isinstance(value, str):
        raise RowSkip("non-text field", f"{side} is {type(value).__name__}")
    if not value.strip():
        raise RowSkip("empty text", side)
    return value


def _implicit_pair(chosen: list[dict], rejected: list[dict]) -> PreferencePair:
    """TRL's implicit prompt: everything but the last message, which both sides must share."""
    if chosen == rejected:
        raise RowSkip("identical answers", "chosen and rejected are the same conversation")
    shared = next(
        (i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected))
    )
    if not shared == len(chosen) - 1 == len(rejected) - 1:
        raise RowSkip(
            "conversations do not share a prompt",
            f"chosen ({len(chosen)} messages) and rejected ({len(rejected)}) differ from message {shared}; only "
            "their last message (the answer) may differ",
        )
    prompt = chosen[:-1]
    if prompt[-1].get("role") != "user":
        raise RowSkip(
            "invalid conversation",
            f"the shared prompt ends on a {prompt[-1].get('role')!r} turn, not a user one",
        )
    for side, conversation in zip(SIDES, (chosen, rejected)):
        if conversation[-1].get("role") != "assistant":
            role = conversation[-1].get("role")
            raise RowSkip(
                "invalid answer", f"the last message of {side} is a {role!r} turn, not an assistant answer"
            )
    return PreferencePair(prompt, _answer(chosen[-1:], "chosen"), _answer(rejected[-1:], "rejected"))


def encode_pair(tokenizer: Tokenizer, pair: PreferencePair) -> dict[str, list[int]]:
    """Each side's ids and labels (PREFERENCE_KEYS); RowSkip when the format cannot encode the row."""
    sample, prompts = {}, []
    for side, answer in zip(SIDES, (pair.chosen, pair.rejected)):
        ids, labels, prompt_length = _encode_side(
            tokenizer, [*pair.prompt, {"role": "assistant", "content": answer}]
        )
        sample[f"{side}_input_ids"], sample[f"{side}_labels"] = ids, labels
        prompts.append(ids[:prompt_length])
    if sample["chosen_input_ids"] == sample["rejected_input_ids"]:
        raise RowSkip("identical answers", "chosen and rejected encode to the same tokens")
    if prompts[0] != prompts[1]:  # mistral-common encodes the prompt before the answer, so never expected
        raise RowSkip("prompt encoded differently", "the chosen and rejected sides' prompt ids differ")
    return sample


def _encode_side(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int], int]:
    """The conversation's fine-tuning ids, labels on its last answer only, and where that answer starts."""
    try:
        encoded = tokenizer.encode_chat(messages, training=True)
    except TemplateError as error:
        raise RowSkip("invalid conversation", str(error)) from None
    start, end = encoded.answers[-1]
    labels = [IGNORE_INDEX] * start + encoded.ids[start:end] + [IGNORE_INDEX] * (len(encoded.ids) - end)
    return encoded.ids, labels, start


def prompt_length(sample: dict[str, list[int]]) -> int:
    """Tokens before the answer (the first labelled position); the same on both sides."""
    return next(i for i, label in enumerate(sample["chosen_labels"]) if label != IGNORE_INDEX)


def fit_pair_length(
    sample: dict[str, list[int]], limit: int, overlong: str
) -> tuple[dict[str, list[int]], bool]:
    """The sample within `limit` tokens per side, and whether a side was cut: with `truncate` each longer side
    keeps its whole prompt and its answer's first tokens up to `limit`. RowSkip when the prompt alone fills
    `limit`, or (`skip`) a side is longer."""
    prompt = prompt_length(sample)
    if prompt >= limit:
        raise RowSkip("prompt alone over --seq-length", f"{prompt} >= {limit} tokens")
    over = {side: n for side in SIDES if (n := len(sample[f"{side}_input_ids"])) > limit}
    if not over:
        return sample, False
    if overlong == "skip":
        sides = ", ".join(f"{side} {length}" for side, length in over.items())
        raise RowSkip("longer than --seq-length", f"{sides} > {limit} tokens")
    return {key: ids[:limit] for key, ids in sample.items()}, True
