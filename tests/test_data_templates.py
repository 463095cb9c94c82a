"""Instruction templates against independent references: mistral-common v1 ids and hand-built label masks."""

from __future__ import annotations

import shutil

import pytest
import sentencepiece as spm
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_lightning.prompts import (
    IGNORE_INDEX,
    TemplateError,
    encode_alpaca,
    encode_chat_prompt,
    encode_mistral_chat,
)
from mistral_lightning.tokenizer import Tokenizer, TokenizerError

MESSAGE_TYPES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
CONVERSATIONS = {
    "single turn": [
        {"role": "user", "content": "Reverse the words: red cat sun"},
        {"role": "assistant", "content": "sun cat red"},
    ],
    "multi turn with system": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And in words, with a newline?\nPlease."},
        {"role": "assistant", "content": "Four. 四"},
    ],
}


@pytest.fixture(scope="module")
def reference():
    return MistralTokenizer.v1()


def _reference_ids(reference, messages, answer_prefix=False):
    """mistral-common v1 tokens; a final assistant turn is encoded as a prefix, then closed with EOS."""
    typed = [MESSAGE_TYPES[m["role"]](content=m["content"]) for m in messages]
    if answer_prefix:
        typed[-1] = AssistantMessage(content=messages[-1]["content"], prefix=True)
    tokens = reference.encode_chat_completion(ChatCompletionRequest(messages=typed)).tokens
    return tokens + [reference.instruct_tokenizer.tokenizer.eos_id] if answer_prefix else tokens


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mistral_chat_ids_equal_mistral_common_v1(tokenizer, reference, name):
    messages = CONVERSATIONS[name]
    sample = encode_mistral_chat(tokenizer, messages)
    assert sample.input_ids == _reference_ids(reference, messages, answer_prefix=True)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mistral_labels_mask_every_prompt_token(tokenizer, reference, name):
    messages = CONVERSATIONS[name]
    sample = encode_mistral_chat(tokenizer, messages)
    # Expected mask from mistral-common alone: each answer starts where the prompt up to it ends.
    expected = [IGNORE_INDEX] * len(sample.input_ids)
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(_reference_ids(reference, messages[:turn]))
            end = len(_reference_ids(reference, messages[: turn + 1], answer_prefix=True))
            expected[start:end] = sample.input_ids[start:end]
    assert sample.labels == expected
    assert sample.labels[-1] == tokenizer.eos_id  # the answer's </s> is learned


def test_chat_prompt_equals_mistral_common(tokenizer, reference):
    messages = CONVERSATIONS["multi turn with system"][:-1]
    assert encode_chat_prompt(tokenizer, messages) == _reference_ids(reference, messages)
    assert encode_chat_prompt(tokenizer, [{"role": "user", "content": "hi"}]) == _reference_ids(
        reference, [{"role": "user", "content": "hi"}]
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "assistant", "content": "a"}], "expected 'user'"),
        ([{"role": "user", "content": "u"}, {"role": "user", "content": "u"}], "expected 'assistant'"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}], "no text"),
        ([{"role": "user", "content": "u"}], "must end with a assistant"),
        ([{"role": "system", "content": "s"}], "no user message"),
    ],
)
def test_bad_conversations_are_rejected(tokenizer, messages, message):
    with pytest.raises(TemplateError, match=message):
        encode_mistral_chat(tokenizer, messages)


@pytest.mark.parametrize("append_eod", [False, True])
@pytest.mark.parametrize("input_text", ["", "red cat sun"])
def test_alpaca_labels_token_by_token(tokenizer_path, tokenizer, append_eod, input_text):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    instruction, output = "Reverse the order of the words.", "sun cat red"
    # ModelLink's AlpacaTemplate rendered by hand.
    prompt = (
        "\nBelow is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. Please note that you need to think through "
        f"your response logically and step by step.\n### Instruction:\n{instruction}\n{input_text}\n### Response:\n"
    )
    sample = encode_alpaca(tokenizer, instruction, input_text, output, append_eod)

    expected_ids = [sp.bos_id()] + sp.encode(prompt + output + "\n") + [sp.eos_id()] * append_eod
    prompt_length = 1 + len(sp.encode(prompt))
    assert sample.input_ids == expected_ids
    assert len(sample.labels) == len(sample.input_ids)
    for position, (token, label) in enumerate(zip(sample.input_ids, sample.labels)):
        assert label == (IGNORE_INDEX if position < prompt_length else token), position
    response_end = len(expected_ids) - append_eod
    assert sp.decode(sample.input_ids[prompt_length:response_end]) == output + "\n"
    assert (sample.labels[-1] == sp.eos_id()) == append_eod


def test_tokenizer_accepts_model_file_or_hf_folder(tmp_path, tokenizer_path):
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    from_folder, from_file = Tokenizer(tmp_path), Tokenizer(tokenizer_path)
    assert from_folder.encode("Hello world", bos=True, eos=True) == from_file.encode(
        "Hello world", True, True
    )
    assert (from_file.bos_id, from_file.eos_id, from_file.vocab_size) == (1, 2, 32000)
    ids = from_file.encode("Hello world", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and from_file.decode(ids) == "Hello world"


def test_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        Tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model is not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")
