"""Our Mistral against transformers' MistralForCausalLM: logits, loss, gradients and weight round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.kernels import chunked_cross_entropy


def tiny_config(num_kv_heads: int, window: int | None) -> MistralConfig:
    return MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=num_kv_heads,
        head_dim=16,
        rope_theta=1e4,
        sliding_window=window,
        max_seq_length=128,
    )


def build_pair(config: MistralConfig, tmp_path) -> tuple[Mistral, transformers.MistralForCausalLM]:
    torch.manual_seed(0)
    ours = Mistral(config)
    ours.init_weights()
    # Non-trivial norm weights, so a swapped or missing norm would show up.
    for name, param in ours.named_parameters():
        if "norm" in name:
            param.data.uniform_(0.5, 1.5)
    folder = ours.save_pretrained(tmp_path / "hf")
    theirs = transformers.MistralForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    return ours, theirs


@pytest.mark.parametrize(
    ("num_kv_heads", "window"),
    [(4, None), (2, None), (1, None), (4, 7), (2, 7), (1, 7), (2, 64)],
    ids=["gqa1-full", "gqa2-full", "gqa4-full", "gqa1-w7", "gqa2-w7", "gqa4-w7", "gqa2-w64"],
)
def test_logits_loss_and_grads_match_transformers(num_kv_heads, window, tmp_path):
    config = tiny_config(num_kv_heads, window)
    ours, theirs = build_pair(config, tmp_path)
    input_ids = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))

    ours_logits = ours(input_ids)
    theirs_logits = theirs(input_ids).logits
    assert (ours_logits - theirs_logits).abs().max().item() < 1e-4

    # HF shifts inside; ours takes already-shifted labels (as the data modules produce them).
    labels = input_ids.clone()
    labels[0, :5] = -100
    shifted = torch.cat((labels[:, 1:], torch.full_like(labels[:, :1], -100)), dim=1)
    ours_loss = ours.loss(input_ids, shifted, chunk_size=8)
    theirs_loss = theirs(input_ids, labels=labels).loss
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)

    ours_loss.backward()
    theirs_loss.backward()
    hf_grads = {name: p.grad for name, p in theirs.named_parameters()}
    from mistral_lightning.checkpoint.hf import to_hf_name

    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, hf_grads[to_hf_name(name)], rtol=1e-4, atol=1e-6, msg=name)


def test_position_ids_are_respected(tmp_path):
    config = tiny_config(2, 5)
    ours, theirs = build_pair(config, tmp_path)
    input_ids = torch.randint(0, config.vocab_size, (1, 12))
    position_ids = torch.arange(7, 19)[None]
    expected = theirs(input_ids, position_ids=position_ids).logits
    assert (ours(input_ids, position_ids) - expected).abs().max().item() < 1e-4


@pytest.mark.processes
@pytest.mark.parametrize("head_kind", ["fused-linear", "fused-linear-compiled", "generic-module"])
@pytest.mark.parametrize("chunk", [1, 7, 60, 128])
def test_chunked_loss_and_grads_equal_plain_cross_entropy(head_kind, chunk):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=False, dtype=torch.float64)
    head = linear if head_kind.startswith("fused-linear") else (lambda x: linear(x))
    hidden = torch.randn(2, 30, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (2, 30), generator=gen)
    labels[:, ::3] = -100
    loss = chunked_cross_entropy(hidden, head, labels, chunk, compiled=head_kind.endswith("compiled"))
    grads = torch.autograd.grad(2.5 * loss, (hidden, linear.weight))
    reference = F.cross_entropy(linear(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected_grads = torch.autograd.grad(2.5 * reference, (hidden, linear.weight))
    torch.testing.assert_close(loss, reference)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, head, labels, chunk), reference)


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_loss_without_any_label_is_zero_with_zero_gradients(compiled):
    linear = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(1, 9, 16, requires_grad=True)
    loss = chunked_cross_entropy(hidden, linear, torch.full((1, 9), -100), 4, compiled=compiled)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, linear.weight))
    assert loss.item() == 0.0
    assert not grad_hidden.any() and not grad_weight.any()
    assert grad_weight.shape == linear.weight.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hf_round_trip_is_bit_identical(dtype, tmp_path):
    config = tiny_config(2, 16)
    torch.manual_seed(0)
    source = transformers.MistralForCausalLM(transformers.MistralConfig(**config.to_hf_dict())).to(dtype)
    source.save_pretrained(tmp_path / "source")
    ours = Mistral.from_pretrained(tmp_path / "source")
    assert ours.embed.weight.dtype == dtype
    ours.save_pretrained(tmp_path / "back", max_shard_bytes=20_000)  # force several shards + an index
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()

    original = load_file(tmp_path / "source" / "model.safetensors")
    reloaded = transformers.MistralForCausalLM.from_pretrained(tmp_path / "back", dtype=dtype)
    state = reloaded.state_dict()
    assert set(original) == set(state)
    for name, tensor in original.items():
        assert state[name].dtype == dtype
        assert torch.equal(state[name], tensor), name


def test_from_pretrained_casts_dtype(tmp_path):
    config = tiny_config(2, None)
    Mistral(config).save_pretrained(tmp_path / "hf")
    model = Mistral.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
