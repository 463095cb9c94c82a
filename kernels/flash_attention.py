"""The CUDA paths: flash-attn's sliding-window kernels, one for a batch and one for packed documents."""

from __future__ import annotations

from itertools import accumulate

import torch

from mistral_lightning.kernels.documents import AttentionMetadata


def flash_window_size(window: int | None) -> tuple[int, int]:
    """flash-attn's (left, right): W - 1 earlier keys and none after, or -1 for no limit."""
    return (-1, 0) if window is None else (window - 1, 0)


def flash_attention(q, k, v, window, *, metadata: AttentionMetadata):
    """flash_attn_func over [B, T, H, D]: every row one sequence (the metadata's documents are not used)."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=True, window_size=flash_window_size(window))


def varlen_arguments(metadata: AttentionMetadata, device: torch.device) -> tuple[torch.Tensor, int]:
    """flash-attn's cu_seqlens (int32 on the device, starting at 0) and the longest document, from the
    lengths the metadata read to the host once."""
    lengths = metadata.document_lengths()
    cu_seqlens = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)
    return cu_seqlens, max(lengths)


def flash_attention_varlen(q, k, v, window, *, metadata: AttentionMetadata):
    """flash_attn_varlen_func over the batch flattened to tokens, each document its own sequence."""
    from flash_attn import flash_attn_varlen_func

    batch, seq_len = q.shape[:2]
    cu_seqlens, max_len = metadata.derived(
        ("flash_varlen", q.device), lambda: varlen_arguments(metadata, q.device)
    )
    out = flash_attn_varlen_func(
        *(x.reshape(batch * seq_len, *x.shape[2:]) for x in (q, k, v)),
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        causal=True,
        window_size=flash_window_size(window),
    )
    return out.reshape(q.shape)
