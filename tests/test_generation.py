"""Decoding against independent references: transformers' greedy generate, a cache-free recompute,
mistral-common's chat token ids, and the same model run under the training TP plan over gloo."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
import transformers
from distributed import run_on_ranks

from mistral_lightning import Mistral, MistralConfig, cli
from mistral_lightning.checkpoint.hf import CheckpointError
from mistral_lightning.generation import GenerationError, RollingKVCache, generate, next_token_logits
from mistral_lightning.generation import cli as generate_cli
from mistral_lightning.generation.loading import load_model
from mistral_lightning.generation.sampling import sample_next_tokens

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 42]]
NEW_TOKENS = 16


def random_model(window: int | None, vocab_size: int = 256, max_seq_length: int = 128) -> Mistral:
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        sliding_window=window,
        max_seq_length=max_seq_length,
        # Large weights make the next token depend strongly on the context, so a cache bug shows.
        initializer_range=0.2,
    )
    model = Mistral(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


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


def test_chat_prompt_ids_equal_mistral_common_v1(tokenizer):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral_lightning.prompts import encode_chat_prompt

    turns = ["What is the capital of France?", "Paris.", "And of Italy, in one word?"]
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)
    ]
    request = ChatCompletionRequest(
        messages=[
            (UserMessage if i % 2 == 0 else AssistantMessage)(content=text) for i, text in enumerate(turns)
        ]
    )
    assert (
        encode_chat_prompt(tokenizer, messages)
        == MistralTokenizer.v1().encode_chat_completion(request).tokens
    )


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


# ---------------------------------------------------------------- tensor parallelism


def _generate_under_tensor_parallelism(folder: str) -> list[list[int]]:
    from torch.distributed.device_mesh import init_device_mesh

    from mistral_lightning.checkpoint.hf import HFCheckpoint, load_hf_weights
    from mistral_lightning.parallel import parallelize

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    checkpoint = HFCheckpoint(folder)
    with torch.device("meta"):
        model = Mistral(checkpoint.config)
    # Decoding feeds one token per step, which a sequence-sharded residual stream cannot split.
    parallelize(model, mesh, sequence_parallel=False)
    model.to_empty(device="cpu")
    load_hf_weights(model, checkpoint)
    return generate(model, PROMPTS, 8, eos_id=None)


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
