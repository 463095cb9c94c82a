"""Decoding against independent references: transformers' greedy generate, a cache-free recompute,
mistral-common's chat token ids for the model's own tokenizer, and the same model run under the training TP
plan over gloo."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers.models import random_model
from helpers.processes import run_on_ranks
from helpers.tokenizer_references import CONVERSATION, SHIPPED, prompt_ids, reference

from mistral_lightning import Mistral, MistralConfig, cli
from mistral_lightning.checkpoint.hf import CheckpointError
from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint
from mistral_lightning.cli import generate as generate_cli
from mistral_lightning.generation import GenerationError, RollingKVCache, generate, next_token_logits
from mistral_lightning.generation.decoding import stream_generate
from mistral_lightning.generation.loading import load_model
from mistral_lightning.generation.sampling import sample_next_tokens
from mistral_lightning.generation.text_stream import StopTextStream
from mistral_lightning.tokenizer import Tokenizer

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 42]]
NEW_TOKENS = 16


def greedy_without_cache(model: Mistral, prompt: list[int], new_tokens: int) -> list[int]:
    sequence = list(prompt)
    for _ in range(new_tokens):
        sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt) :]


@pytest.fixture(scope="module", params=[None, 6], ids=["full", "window6"])
def model_pair(request, tmp_path_factory):
    """Our model and transformers' MistralForCausalLM loaded from the same saved weights."""
    ours = random_model(request.param)
    folder = ours.save_pretrained(tmp_path_factory.mktemp("hf"))
    theirs = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


@pytest.mark.parametrize("chunk", [None, 4], ids=["one-chunk", "chunked-prefill"])
def test_greedy_equals_transformers_and_cache_free_decoding(model_pair, chunk):
    ours, theirs = model_pair
    batched = generate(ours, PROMPTS, NEW_TOKENS, eos_id=None, prefill_chunk_size=chunk)
    for prompt, tokens in zip(PROMPTS, batched):
        reference = theirs.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert tokens == reference
        assert tokens == greedy_without_cache(ours, prompt, NEW_TOKENS)


def test_the_window_changes_the_output():
    """Guards the parity test above: with the window shorter than prompt + generation, it matters."""
    windowed, full = random_model(6), random_model(None)
    assert generate(windowed, PROMPTS, NEW_TOKENS, eos_id=None) != generate(
        full, PROMPTS, NEW_TOKENS, eos_id=None
    )


def test_next_token_logits_of_a_padded_batch_equal_a_full_forward(model_pair):
    ours, theirs = model_pair
    logits = next_token_logits(ours, PROMPTS, prefill_chunk_size=3)
    for row, prompt in enumerate(PROMPTS):
        expected = theirs(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)


def test_rolling_cache_holds_only_the_window():
    model = random_model(window=4)
    prompt = torch.tensor([[1, 7, 3, 9, 12, 30]])
    cache = RollingKVCache(pad_lengths=torch.zeros(1, dtype=torch.long), capacity=4, window=4)
    sequence = prompt
    logits = model(prompt, cache.advance(prompt.shape[1]), kv_cache=cache)
    for _ in range(30):
        token = logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat((sequence, token), dim=1)
        logits = model(token, cache.advance(1), kv_cache=cache)
    assert all(keys.shape == (1, 4, 2, 16) for keys in cache.keys.values())
    torch.testing.assert_close(logits[:, -1], model(sequence)[:, -1], rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = random_model(window=None)

    def sample(seed: int, **options) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return generate(
            model, PROMPTS, NEW_TOKENS, eos_id=None, generator=generator, temperature=1.0, **options
        )

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    assert sample(3, top_p=0.9, top_k=50) == sample(3, top_p=0.9, top_k=50)
    greedy = generate(model, PROMPTS, NEW_TOKENS, eos_id=None)
    assert sample(5, top_k=1) == greedy
    assert sample(6, top_p=1e-6) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4)
    tokens = sample_next_tokens(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    tokens = sample_next_tokens(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1, 2}


def test_rows_stop_at_eos_or_a_stop_sequence_independently():
    model = random_model(window=None)
    free = generate(model, PROMPTS, NEW_TOKENS, eos_id=None)
    eos = free[0][5]
    stopped = generate(model, PROMPTS, NEW_TOKENS, eos_id=eos)
    for tokens, full in zip(stopped, free):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert tokens == expected
    stop = free[1][3:5]
    stopped = generate(model, PROMPTS, NEW_TOKENS, eos_id=None, stop_sequences=[stop])
    assert stopped[1] == free[1][:5]


def _generate_capturing_the_cache(model: Mistral, *args, **kwargs) -> tuple[list[list[int]], int]:
    """`generate`'s output and how many entries per row its KV cache holds."""
    caches = []
    hook = model.register_forward_pre_hook(
        lambda module, inputs, options: caches.append(options["kv_cache"]), with_kwargs=True
    )
    try:
        outputs = generate(model, *args, **kwargs)
    finally:
        hook.remove()
    return outputs, caches[0].keys[0].shape[1]


def test_each_row_caches_its_own_prompt_and_new_tokens_and_decodes_as_alone(model_pair):
    """A long prompt with few new tokens beside a short one with many: the cache holds what the longest
    row needs (at most the context), not the longest prompt plus the most new tokens for every row."""
    ours, theirs = model_pair
    context, window = ours.config.max_seq_length, ours.config.sliding_window
    prompts = [PROMPTS[1] * 6, PROMPTS[2]]  # 78 and 2 tokens
    # One limit for both (the 78-token prompt has room for 50 of them), then one limit per row.
    for limits, lengths, entries in ((120, [50, 120], context), ([4, 120], [4, 120], 2 + 120)):
        outputs, cached = _generate_capturing_the_cache(ours, prompts, limits, eos_id=None)
        assert cached == (entries if window is None else window)
        assert [len(tokens) for tokens in outputs] == lengths
        for prompt, tokens in zip(prompts, outputs):
            alone = theirs.generate(
                torch.tensor([prompt]),
                max_new_tokens=len(tokens),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
            assert tokens == alone


def test_a_tiny_temperature_samples_the_best_token():
    model = random_model(window=None)
    greedy = generate(model, PROMPTS, NEW_TOKENS, eos_id=None)
    generator = torch.Generator().manual_seed(0)
    assert (
        generate(model, PROMPTS, NEW_TOKENS, eos_id=None, temperature=1e-300, generator=generator) == greedy
    )


class RecordingTokenizer:
    """The real tokenizer, recording how many ids each decode is given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def decode(self, ids: list[int]) -> str:
        self.decoded_lengths.append(len(ids))
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_streamed_text_is_the_whole_decoding_at_constant_work_per_token(name):
    """StopTextStream (generate's printing, the server's streams) decodes a few ids per token, never the
    whole text again, and its pieces make mistral-common's decoding of all the ids, cut at a stop string.
    Random ids bring byte tokens, control tokens and split characters."""
    decoder = reference(name).instruct_tokenizer.tokenizer
    text = " ".join(message["content"] for message in CONVERSATION) * 30  # Chinese, emoji, newlines
    random_ids = torch.randint(0, decoder.n_words, (1500,), generator=torch.Generator().manual_seed(0))
    tokenizer = Tokenizer(SHIPPED[name])
    for ids in (decoder.encode(text, bos=False, eos=False), random_ids.tolist()):
        expected = decoder.decode(ids)
        stop = expected[len(expected) // 2 : len(expected) // 2 + 3]
        for stops, whole in (([], expected), (["never said", stop], expected[: expected.index(stop)])):
            recording = RecordingTokenizer(tokenizer)
            stream = StopTextStream(recording, stops)
            pieces = [stream.add(token) for token in ids]
            pieces.append(stream.finish())
            assert "".join(pieces) == stream.text == whole
            assert stream.stopped == bool(stops)
            assert max(recording.decoded_lengths) <= 12


def test_bad_prompts_are_rejected_with_the_reason():
    model = random_model(window=None, max_seq_length=32)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [], 4)
    with pytest.raises(GenerationError, match=r"prompt 0 has 40 tokens but the model's context is 32"):
        generate(model, [[1] * 40], 4)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [[1, 2]], 4, temperature=-1.0)
    # The prompt is never truncated; generation stops where the context is full.
    assert len(generate(model, [[1] * 29], 10, eos_id=None)[0]) == 3


# ---------------------------------------------------------------- command line and checkpoints


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random model with the real 32000-token vocabulary, saved as an HF folder."""
    model = random_model(window=8, vocab_size=32000)
    return model, model.save_pretrained(tmp_path_factory.mktemp("tiny"))


def test_generate_command_prints_the_greedy_completion(tiny_checkpoint, tokenizer, tokenizer_path, capsys):
    model, folder = tiny_checkpoint
    args = ["--checkpoint", str(folder), "--tokenizer-model", tokenizer_path, "--max-new-tokens", "12"]
    assert generate_cli.main([*args, "--prompt", "The capital of France is"]) == 0
    expected = generate(model, [tokenizer.encode("The capital of France is")], 12, eos_id=tokenizer.eos_id)[0]
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"

    stop = tokenizer.decode(expected)[3:6]
    assert generate_cli.main([*args, "--prompt", "The capital of France is", "--stop", stop]) == 0
    assert capsys.readouterr().out == tokenizer.decode(expected).split(stop)[0] + "\n"


def test_interactive_chat_reads_turns_from_stdin(
    tiny_checkpoint, tokenizer, tokenizer_path, capsys, monkeypatch
):
    from mistral_lightning.prompts import encode_chat_prompt

    model, folder = tiny_checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nTell me more\n\n"))
    args = [
        "--checkpoint",
        str(folder),
        "--tokenizer-model",
        tokenizer_path,
        "--max-new-tokens",
        "6",
        "--chat",
    ]
    assert generate_cli.main(args) == 0
    replies = capsys.readouterr().out.splitlines()
    first = [{"role": "user", "content": "Hello there"}]
    expected_first = tokenizer.decode(generate(model, [encode_chat_prompt(tokenizer, first)], 6)[0])
    assert len(replies) == 2 and replies[0] == expected_first
    second = [
        *first,
        {"role": "assistant", "content": expected_first.strip()},
        {"role": "user", "content": "Tell me more"},
    ]
    assert replies[1] == tokenizer.decode(generate(model, [encode_chat_prompt(tokenizer, second)], 6)[0])


def test_checkpoint_folder_without_weights_is_a_clear_error(
    tiny_checkpoint, tmp_path, tokenizer_path, capsys
):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights to load"):
        load_model(empty)
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny_checkpoint[1] / "config.json").read_text())
    code = cli.main(
        ["generate", "--checkpoint", str(only_config), "--tokenizer-model", tokenizer_path, "--prompt", "x"]
    )
    assert code == 2
    assert "no weights found" in capsys.readouterr().err


def test_a_training_checkpoint_file_loads_like_the_hf_folder(tiny_checkpoint, tmp_path):
    model, folder = tiny_checkpoint
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    loaded = load_model(tmp_path / "last.ckpt")
    assert generate(loaded, PROMPTS, 8) == generate(model, PROMPTS, 8)


# ---------------------------------------------------------------- the tokenizer follows the model

# Each tokenizer under the name Mistral's HF folders give it, with the vocabulary of its models.
PUBLISHED = {
    "v1": ("tokenizer.model", 32000),
    "v3": ("tokenizer.model.v3", 32768),
    "v7": ("tokenizer.model.v7", 32768),
    "tekken": ("tekken.json", 131072),
}


def release_folder(folder, name: str):
    """An HF folder as Mistral publishes a release: random weights, config.json and its tokenizer file."""
    file, vocab_size = PUBLISHED[name]
    model = random_model(window=None, vocab_size=vocab_size)
    model.save_pretrained(folder)
    shutil.copy(SHIPPED[name], folder / file)
    return folder


@pytest.fixture
def captured_prompts(monkeypatch):
    """The prompt ids `generate` hands to the decoder."""
    prompts = []

    def recording(model, batch, *args, **kwargs):
        prompts.extend(batch)
        return stream_generate(model, batch, *args, **kwargs)

    monkeypatch.setattr(generate_cli, "stream_generate", recording)
    return prompts


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_generate_chat_prompts_are_mistral_common_ids_of_the_models_tokenizer(
    tmp_path, name, captured_prompts, capsys, monkeypatch
):
    folder = release_folder(tmp_path / "release", name)
    args = ["--checkpoint", str(folder), "--max-new-tokens", "4", "--chat"]
    assert generate_cli.main([*args, "--prompt", CONVERSATION[1]["content"]]) == 0
    assert captured_prompts[0] == prompt_ids(name, [CONVERSATION[1]])

    monkeypatch.setattr(sys, "stdin", io.StringIO("First question 你好\nSecond one 🙂\n\n"))
    capsys.readouterr()
    assert generate_cli.main(args) == 0
    reply = capsys.readouterr().out.splitlines()[0].strip()
    first = [{"role": "user", "content": "First question 你好"}]
    history = [*first, {"role": "assistant", "content": reply}] if reply else []
    assert captured_prompts[1:] == [
        prompt_ids(name, first),
        prompt_ids(name, [*history, {"role": "user", "content": "Second one 🙂"}]),
    ]


def _fit_checkpoint(path, pretrained, model: Mistral) -> None:
    """What `fit` saves, as a .ckpt file or a DCP folder, recording model.pretrained in its hyper-parameters."""
    import torch.distributed.checkpoint as dcp

    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    metadata = {"hyper_parameters": {"pretrained": str(pretrained)}, "mistral_config": vars(model.config)}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state, **metadata}, path)
    else:
        dcp.save({"state_dict": state}, checkpoint_id=path, no_dist=True)
        torch.save(metadata, path / "meta.pt")


@pytest.mark.parametrize("form", ["last.ckpt", "dcp-folder"])
def test_a_fit_checkpoint_uses_the_tokenizer_of_its_pretrained_folder(tmp_path, form, captured_prompts):
    folder = release_folder(tmp_path / "Mistral-7B-Instruct-v0.3", "v3")
    checkpoint = tmp_path / form
    _fit_checkpoint(checkpoint, folder, Mistral.from_pretrained(folder))
    args = ["--checkpoint", str(checkpoint), "--max-new-tokens", "2", "--chat", "--prompt", "Hi"]
    assert generate_cli.main(args) == 0
    assert captured_prompts == [prompt_ids("v3", [{"role": "user", "content": "Hi"}])]


def test_tokenizer_option_overrides_and_v1_is_used_only_when_nothing_is_known(
    tmp_path, tiny_checkpoint, tokenizer_path, captured_prompts, capsys
):
    _, folder = tiny_checkpoint  # an HF folder without tokenizer files
    args = ["--checkpoint", str(folder), "--max-new-tokens", "2", "--chat", "--prompt", "Hi"]
    assert generate_cli.main(args) == 0
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "names no tokenizer" in note and "tokenizer.model.v1" in note
    assert generate_cli.main([*args, "--tokenizer", tokenizer_path]) == 0
    assert "names no tokenizer" not in capsys.readouterr().err
    message = [{"role": "user", "content": "Hi"}]
    assert captured_prompts == [prompt_ids("v1", message)] * 2

    release = release_folder(tmp_path / "release", "v3")
    assert generate_cli.main([*args[:1], str(release), *args[2:], "--tokenizer", str(SHIPPED["v7"])]) == 0
    assert captured_prompts[2] == prompt_ids("v7", message)


def test_bad_tokenizer_choices_get_one_line(tmp_path, tiny_checkpoint, capsys):
    _, folder = tiny_checkpoint  # vocabulary 32000
    base = ["generate", "--checkpoint", str(folder), "--prompt", "Hi"]
    for extra, message in [
        (["--tokenizer", str(SHIPPED["v3"])], "has 32768 tokens but the model .* has a vocabulary of 32000"),
        (["--tokenizer", str(tmp_path)], "has no tokenizer"),
        (["--stop", ""], 'stop "" would stop before the first character'),
    ]:
        assert cli.main([*base, *extra]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and re.search(message, error), error

    moved = tmp_path / "last.ckpt"
    _fit_checkpoint(moved, tmp_path / "gone", tiny_checkpoint[0])
    assert cli.main(["generate", "--checkpoint", str(moved), "--prompt", "Hi"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "gone, which no longer exists" in error


def test_predict_encodes_chats_with_the_tokenizer_of_model_pretrained(tmp_path):
    import lightning as L

    from mistral_lightning.generation.predict_data import PromptsDataModule

    folder = release_folder(tmp_path / "release", "v7")
    model = Mistral.from_pretrained(folder)

    class Predictor(L.LightningModule):
        """Holds what MistralLightningModule exposes: hparams.pretrained and the model's config."""

        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"pretrained": str(folder)})
            self.model, self.config = model, model.config

        def predict_step(self, batch, batch_idx):
            return batch["input_ids"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"messages": CONVERSATION[:2]}) + "\n" + json.dumps({"prompt": "Hello"}) + "\n"
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    batches = trainer.predict(Predictor(), datamodule=PromptsDataModule(str(prompts), chat=True))
    assert batches[0] == [
        prompt_ids("v7", CONVERSATION[:2]),
        prompt_ids("v7", [{"role": "user", "content": "Hello"}]),
    ]


def test_evaluate_chat_template_prompts_are_mistral_common_ids_of_the_models_tokenizer(tmp_path, monkeypatch):
    from mistral_lightning.cli import evaluate as evaluate_cli
    from mistral_lightning.evaluation import mmlu
    from mistral_lightning.evaluation.mmlu_data import build_prompt, load_mmlu

    for split, rows in (("dev", ["Two plus two?,3,4,5,6,B"]), ("test", ["Three plus three?,6,7,8,9,A"])):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / f"arithmetic_{split}.csv").write_text("\n".join(rows) + "\n")
    prompts = []

    def recording(model, batch, **kwargs):
        prompts.extend(batch)
        return next_token_logits(model, batch, **kwargs)

    monkeypatch.setattr(mmlu, "next_token_logits", recording)
    folder = release_folder(tmp_path / "release", "v3")
    args = ["--data-dir", str(tmp_path / "mmlu"), "--checkpoint", str(folder), "--shots", "1"]
    assert evaluate_cli.main([*args, "--chat-template", "--output", str(tmp_path / "out.json")]) == 0
    (subject,) = load_mmlu(tmp_path / "mmlu", shots=1)
    text = build_prompt(subject.name, subject.dev, subject.test[0])
    assert prompts == [prompt_ids("v3", [{"role": "user", "content": text}])]


def test_a_nemo_shaped_release_preprocesses_trains_and_chats_with_its_own_tokenizer(
    tmp_path, monkeypatch, captured_prompts
):
    """A tiny random MistralForCausalLM shaped like Mistral-NeMo (head_dim != hidden / heads, vocabulary
    131072, no window) with tekken.json: config.json loads as transformers reads it, `preprocess` encodes chats
    with the folder's tekken, `fit` trains from the folder, and `generate --chat` on the training checkpoint
    uses the tekken of the model.pretrained it records."""
    monkeypatch.chdir(tmp_path)
    hf_config = transformers.MistralConfig(
        vocab_size=131072,
        hidden_size=64,
        head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        sliding_window=None,
        rope_theta=1e6,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    theirs = transformers.MistralForCausalLM(hf_config).eval()
    theirs.save_pretrained("Mistral-Nemo-tiny")
    shutil.copy(SHIPPED["tekken"], "Mistral-Nemo-tiny/tekken.json")
    config = MistralConfig.from_hf("Mistral-Nemo-tiny")
    assert (config.head_dim, config.hidden_size // config.num_heads, config.sliding_window) == (32, 16, None)
    ids = torch.tensor([[1, 3, 37133, 1032, 124108, 4, 22177]])
    with torch.no_grad():
        torch.testing.assert_close(
            Mistral.from_pretrained("Mistral-Nemo-tiny")(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4
        )

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{n} + {n} = ? 🧮"},
                {"role": "assistant", "content": str(2 * n)},
            ]
        }
        for n in range(200)
    ]
    Path("chat.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    preprocess = ["preprocess", "--input", "chat.jsonl", "--tokenizer-name-or-path", "Mistral-Nemo-tiny"]
    preprocess += [
        "--output-prefix",
        "demo_output/data/alpaca",
        "--handler-name",
        "MistralInstructionHandler",
    ]
    assert cli.main(preprocess) == 0
    fit = ["fit", "--config", str(Path(__file__).parents[1] / "configs" / "tiny" / "finetune.yaml")]
    fit += ["--model.model_config", "null", "--model.pretrained", "Mistral-Nemo-tiny"]
    fit += ["--data.init_args.seq_length", "32", "--data.init_args.micro_batch_size", "2"]
    fit += [
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]
    assert cli.main([*fit, "--trainer.enable_progress_bar", "false"]) == 0
    checkpoint = "runs/tiny-finetune/checkpoints/last.ckpt"
    trained = LightningCheckpoint(checkpoint).read("lm_head.weight")
    assert trained.shape == (131072, 64) and not torch.equal(trained, theirs.lm_head.weight)

    assert (
        generate_cli.main(
            ["--checkpoint", checkpoint, "--chat", "--prompt", "2 + 2 = ?", "--max-new-tokens", "2"]
        )
        == 0
    )
    assert captured_prompts == [prompt_ids("tekken", [{"role": "user", "content": "2 + 2 = ?"}])]


# ---------------------------------------------------------------- tensor parallelism


def _generate_under_tensor_parallelism(folder: str) -> list[list[int]]:
    from torch.distributed.device_mesh import init_device_mesh

    from mistral_lightning.checkpoint.hf import HFCheckpoint, load_hf_weights
    from mistral_lightning.training.parallel import parallelize

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    checkpoint = HFCheckpoint(folder)
    with torch.device("meta"):
        model = Mistral(checkpoint.config)
    # Decoding feeds one token per step, which a sequence-sharded residual stream cannot split.
    parallelize(model, mesh, sequence_parallel=False)
    model.to_empty(device="cpu")
    load_hf_weights(model, checkpoint)
    return generate(model, PROMPTS, 8, eos_id=None)


@pytest.mark.processes
def test_generation_under_the_training_tensor_parallel_plan(tmp_path):
    ours = random_model(window=6)
    folder = ours.save_pretrained(tmp_path / "hf")
    expected = generate(ours, PROMPTS, 8, eos_id=None)
    assert run_on_ranks(_generate_under_tensor_parallelism, str(folder)) == [expected, expected]


def test_predict_writes_jsonl_through_lightning(tiny_checkpoint, tokenizer, tokenizer_path, tmp_path):
    import lightning as L

    from mistral_lightning.generation.predict_data import PromptsDataModule
    from mistral_lightning.generation.predict_writer import JsonlPredictionWriter

    model, _ = tiny_checkpoint

    class Predictor(L.LightningModule):
        """Stands in for MistralLightningModule.predict_step, which makes the same call."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def predict_step(self, batch, batch_idx):
            return generate(self.model, batch["input_ids"], 5, eos_id=tokenizer.eos_id)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Once upon a time"}\n\n{"prompt": "Hello", "id": 7}\n{"prompt": "A B C"}\n'
    )
    data = PromptsDataModule(str(prompts), tokenizer_path, batch_size=2)
    output = tmp_path / "out" / "completions.jsonl"
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[JsonlPredictionWriter(str(output))],
        logger=False,
        enable_progress_bar=False,
    )
    trainer.predict(Predictor(), datamodule=data, return_predictions=False)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    texts = ["Once upon a time", "Hello", "A B C"]
    assert [row["prompt"] for row in rows] == texts
    expected = generate(model, [tokenizer.encode(text) for text in texts], 5, eos_id=tokenizer.eos_id)
    assert [row["completion"] for row in rows] == [tokenizer.decode(ids) for ids in expected]
