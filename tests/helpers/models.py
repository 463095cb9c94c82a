"""Tiny random models."""

from __future__ import annotations

import copy

import torch

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.adapters.lora import LoRAConfig, apply_lora, is_adapter_parameter


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


def adapted(model: Mistral, lora: LoRAConfig, seed: int = 1) -> Mistral:
    """A copy of `model` with LoRA applied and random nonzero A and B, as if trained."""
    model = copy.deepcopy(model)
    apply_lora(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_parameter(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()
