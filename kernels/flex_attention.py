"""CUDA attention where flash-attn cannot run: PyTorch FlexAttention with a sliding-window block mask.

The mask is a `mask_mod` (key j visible to query i iff j <= i + halo and i + halo - j < W, and, with packed
documents, both in the same document); `create_block_mask` turns it into a block-sparse mask once per batch
(kept in the batch's AttentionMetadata, so every layer reuses it), and the kernel skips every block the mask
leaves empty: outside the band and across documents. On CUDA the call is compiled (FlexAttention's fused
kernel exists only compiled); elsewhere it runs eagerly, which PyTorch supports for the forward pass only
(its CPU backward is not implemented), so training on the CPU keeps the portable paths.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mistral_lightning.kernels.documents import AttentionMetadata


def sliding_window_mask_mod(window: int | None, halo: int, document_ids: torch.Tensor | None):
    """FlexAttention's mask_mod: query i sits at key position halo + i (context parallelism's halo keys come
    first; 0 otherwise); `document_ids` [B, halo + T] cover the keys."""

    def visible(b, h, q_idx, kv_idx):
        position = q_idx + halo
        keep = kv_idx <= position
        if window is not None:
            keep = keep & (position - kv_idx < window)
        if document_ids is not None:
            keep = keep & (document_ids[b, position] == document_ids[b, kv_idx])
        return keep

    return visible


def sliding_window_block_mask(
    metadata: AttentionMetadata, window: int | None, halo: int, q: torch.Tensor, k: torch.Tensor
) -> BlockMask:
    """The batch's block mask for [B, T, H, D] queries over [B, halo + T, Hkv, D] keys, built once per batch."""
    documents = metadata.document_ids

    def build() -> BlockMask:
        return create_block_mask(
            sliding_window_mask_mod(window, halo, documents),
            None if documents is None else q.shape[0],
            None,
            q.shape[1],
            k.shape[1],
            device=q.device,
            _compile=q.device.type == "cuda",  # compiled, it never materialises the [T, T] mask
        )

    return metadata.derived(("flex_block_mask", window, halo, q.shape[1], k.shape[1], q.device), build)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_halo_attention(q, k, v, window, halo, *, metadata: AttentionMetadata):
    """Queries [B, T, H, D] over the `halo` keys before them and their own ([B, halo + T, Hkv, D])."""
    block_mask = sliding_window_block_mask(metadata, window, halo, q, k)
    run = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    out = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=True)
    return out.transpose(1, 2)


def flex_sliding_window_attention(q, k, v, window, *, metadata: AttentionMetadata):
    """Causal sliding-window attention over [B, T, H, D], packed documents masked by the block mask."""
    return flex_halo_attention(q, k, v, window, 0, metadata=metadata)
