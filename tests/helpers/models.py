"""Tiny random models."""

from __future__ import annotations

import torch

from mistral_lightning import Mistral, MistralConfig


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
