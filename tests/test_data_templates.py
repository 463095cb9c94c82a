"""Instruction templates against independent references: mistral-common's ids for every tokenizer it ships,
the answer mask by the format's own rule, and ModelLink's Alpaca template rendered by hand."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from helpers.tokenizer_references import CONVERSATION, SHIPPED, answer_labels, finetuning_ids, prompt_ids

from mistral_lightning.prompts import (
    IGNORE_INDEX,
    TemplateError,
    encode_alpaca,
    encode_chat_prompt,
    encode_mistral_chat,
)
from mistral_lightning.tokenizer import Tokenizer

SINGLE_TURN = [
    {"role": "user", "content": "Reverse the words: red cat sun"},
    {"role": "assistant", "content": "sun cat red"},
]


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    return request.param, Tokenizer(SHIPPED[request.param])


@pytest.mark.parametrize("messages", [CONVERSATION, SINGLE_TURN], ids=["multi-turn", "single-turn"])
def test_chat_ids_are_mistral_common_finetuning_ids(shipped, messages):
    name, tokenizer = shipped
    assert encode_mistral_chat(tokenizer, messages).input_ids == finetuning_ids(name, messages)


@pytest.mark.parametrize("messages", [CONVERSATION, SINGLE_TURN], ids=["multi-turn", "single-turn"])
def test_the_loss_covers_exactly_the_answers_and_their_eos(shipped, messages):
    name, tokenizer = shipped
    sample = encode_mistral_chat(tokenizer, messages)
    assert sample.labels == answer_labels(name, sample.input_ids)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert sample.labels.count(tokenizer.eos_id) == len(answers)
    learned = [token for token in sample.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(learned).replace(" ", "") == "".join(answers).replace(" ", "")


def test_v3_writes_inst_as_control_tokens_and_the_system_prompt_in_the_last_turn():
    """The issue's case, by hand: v0.3's [INST] is id 3, not the text tokens 1501, 17057, 29561."""
    v3 = Tokenizer(SHIPPED["v3"])
    ids = encode_mistral_chat(v3, CONVERSATION).input_ids
    assert ids[:2] == [1, 3] and ids.count(3) == 2 and ids.count(4) == 2
    assert [1501, 17057, 29561] != ids[1:4]
    last_turn = ids[len(ids) - 1 - ids[::-1].index(3) :]
    assert v3.decode(last_turn).startswith(CONVERSATION[0]["content"])


def test_chat_prompt_equals_mistral_common(shipped):
    name, tokenizer = shipped
    for messages in (CONVERSATION[:-1], [{"role": "user", "content": "hi"}]):
        assert encode_chat_prompt(tokenizer, messages) == prompt_ids(name, messages)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "assistant", "content": "a"}], "must start with a user message"),
        (
            [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}],
            "message 0 .user. has no text",
        ),
        ([{"role": "user", "content": "u"}], "Expected last role Assistant"),
        ([{"role": "system", "content": "s"}], "Expected last role Assistant"),
        ([{"role": "tool", "content": "t"}], "message 0 has role 'tool'"),
        (
            [
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b"},
            ],
            "both assistant answers",
        ),
    ],
)
def test_conversations_the_format_cannot_encode_are_rejected(tokenizer, messages, message):
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
