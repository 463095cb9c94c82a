"""The tokenizer layer against independent references: sentencepiece and mistral-common for every tokenizer
mistral-common ships, the `tokenizers` library for an HF tokenizer.json, and one-line errors."""

from __future__ import annotations

import shutil
from functools import cache

import pytest
import sentencepiece as spm
import tokenizers
from helpers.tokenizer_references import CONVERSATION, SHIPPED, reference, request, write_tokenizer_json_only

from mistral_lightning import MistralConfig
from mistral_lightning.config import PRESETS
from mistral_lightning.tokenizer import ChatFormatError, Tokenizer, TokenizerError, default_tokenizer_path


@cache
def ours(name: str) -> Tokenizer:
    """Each shipped tokenizer loaded once (a tekken file takes seconds to load)."""
    return Tokenizer(SHIPPED[name])


TEXTS = ["Hello world", "  two leading spaces, 你好 🙂\nand a newline", "短い文書"]


@pytest.fixture(scope="module")
def hf_json_folder(tmp_path_factory):
    return write_tokenizer_json_only(tmp_path_factory.mktemp("only-tokenizer-json"))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_plain_text_is_bos_ids_eos_for_every_shipped_tokenizer(name):
    tokenizer = ours(name)
    raw = reference(name).instruct_tokenizer.tokenizer
    for text in TEXTS:
        assert tokenizer.encode(text, bos=True, eos=True) == [
            raw.bos_id,
            *raw.encode(text, False, False),
            raw.eos_id,
        ]
        assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == raw.decode(
            raw.encode(text, False, False)
        )
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, raw.n_words)


def test_v1_plain_text_is_sentencepiece_byte_for_byte():
    sp = spm.SentencePieceProcessor(model_file=str(SHIPPED["v1"]))
    tokenizer = Tokenizer(SHIPPED["v1"])
    for text in TEXTS:
        assert tokenizer.encode(text, bos=True, eos=False) == [sp.bos_id(), *sp.encode(text)]
        assert tokenizer.encode(text, bos=False, eos=True) == [*sp.encode(text), sp.eos_id()]
    assert tokenizer.vocab_size == sp.vocab_size() == 32000


@pytest.mark.parametrize(
    ("files", "chosen"),
    [
        # Mistral-7B-Instruct-v0.3 as published: tokenizer.model.v3, tokenizer.model (the same file), tokenizer.json.
        ({"tokenizer.model.v3": "v3", "tokenizer.model": "v3", "tokenizer.json": None}, "tokenizer.model.v3"),
        # Mistral-NeMo: tekken.json beside tokenizer.json.
        ({"tekken.json": "tekken", "tokenizer.json": None}, "tekken.json"),
        # Mistral-7B-Instruct-v0.2: tokenizer.model (v1) beside tokenizer.json.
        ({"tokenizer.model": "v1", "tokenizer.json": None}, "tokenizer.model"),
    ],
)
def test_an_hf_folder_uses_mistrals_own_tokenizer_file(tmp_path, hf_json_folder, files, chosen):
    for file, name in files.items():
        shutil.copy(SHIPPED[name] if name else hf_json_folder / "tokenizer.json", tmp_path / file)
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.path == tmp_path / chosen
    expected = reference(files[chosen]).encode_chat_completion(request(CONVERSATION[:-1])).tokens
    assert tokenizer.encode_chat(CONVERSATION[:-1], training=False).ids == expected


def test_tokenizer_json_encodes_plain_text_as_the_tokenizers_library_does(hf_json_folder):
    library = tokenizers.Tokenizer.from_file(str(hf_json_folder / "tokenizer.json"))
    tokenizer = Tokenizer(hf_json_folder)
    bos, eos = library.token_to_id("<s>"), library.token_to_id("</s>")
    for text in TEXTS:
        ids = library.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text, bos=True, eos=True) == [bos, *ids, eos]
        assert tokenizer.decode(tokenizer.encode(text)) == library.decode(ids, skip_special_tokens=True)
    # The fast tokenizer really is the one used: it splits leading spaces unlike sentencepiece.
    sp = spm.SentencePieceProcessor(model_file=str(SHIPPED["v1"]))
    assert tokenizer.encode(TEXTS[1], bos=False) != sp.encode(TEXTS[1])
    assert tokenizer.vocab_size == library.get_vocab_size(with_added_tokens=True) == 32000


def test_tokenizer_json_alone_refuses_chats_in_one_line(hf_json_folder):
    tokenizer = Tokenizer(hf_json_folder)
    with pytest.raises(
        ChatFormatError, match="with only tokenizer.json, the chat format is described by nothing but"
    ) as error:
        tokenizer.encode_chat(CONVERSATION, training=True)
    assert "\n" not in str(error.value)
    with pytest.raises(TokenizerError, match="holds only tokenizer.json.*--tokenizer-not-use-fast"):
        Tokenizer(hf_json_folder, use_fast=False)


def test_an_unversioned_model_file_with_control_tokens_refuses_chats(tmp_path):
    """v0.3's tokenizer.model without its .v3 twin: [INST] is a control token, but which format is unknown."""
    shutil.copy(SHIPPED["v3"], tmp_path / "tokenizer.model")
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.encode("Hello") == reference("v3").instruct_tokenizer.tokenizer.encode(
        "Hello", True, False
    )
    with pytest.raises(ChatFormatError, match=r"no version in its name.*tokenizer\.model\.v3"):
        tokenizer.encode_chat(CONVERSATION[:2], training=False)


def test_bad_tokenizer_paths_get_one_line_naming_them(tmp_path):
    errors = []
    with pytest.raises(TokenizerError, match="has no tokenizer .looked for tekken.json") as error:
        Tokenizer(tmp_path)
    errors.append(error)
    with pytest.raises(TokenizerError, match="missing.model does not exist") as error:
        Tokenizer(tmp_path / "missing.model")
    errors.append(error)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="unknown tokenizer file .*vocab.txt") as error:
        Tokenizer(tmp_path / "vocab.txt")
    errors.append(error)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model is not a valid sentencepiece tokenizer") as error:
        Tokenizer(tmp_path / "bad.model")
    errors.append(error)
    (tmp_path / "tekken_broken.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tekken_broken.json is not a valid tekken tokenizer") as error:
        Tokenizer(tmp_path / "tekken_broken.json")
    errors.append(error)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json is not a valid HF tokenizer.json") as error:
        Tokenizer(tmp_path / "tokenizer.json")
    errors.append(error)
    assert all("\n" not in str(error.value) for error in errors)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused():
    ours("v1").check_fits(32000, "m")
    with pytest.raises(TokenizerError, match="has 32768 tokens but the model m has a vocabulary of 32000"):
        ours("v3").check_fits(32000, "m")
    with pytest.raises(TokenizerError, match="has 131072 tokens"):
        ours("tekken").check_fits(32768, "m")


def test_default_tokenizer_is_mistral_common_v1():
    assert default_tokenizer_path() == SHIPPED["v1"]


# Mistral-7B-v0.3 and Mistral-7B-Instruct-v0.3 config.json, as published on the Hugging Face hub.
MISTRAL_7B_V03_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32768,
}


@pytest.mark.parametrize("preset", ["mistral-7b-v0.3", "mistral-7b-instruct-v0.3"])
def test_v03_presets_equal_the_published_config(preset):
    assert MistralConfig.from_name(preset) == MistralConfig.from_hf_dict(MISTRAL_7B_V03_CONFIG)
    assert PRESETS[preset].vocab_size == ours("v3").vocab_size == 32768
