"""Causal sliding-window attention, exact on every backend, and the decoding step's masked attention.

Layout everywhere: q [B, T, Hq, D], k/v [B, T, Hkv, D] (Hq a multiple of Hkv, GQA), output [B, T, Hq, D].
Semantics (identical to HF transformers): query i sees key j iff i - window < j <= i (kernels.masks.band_mask).
With `document_ids` [B, T], a query additionally sees only keys of its own document (packed samples).
"""

from __future__ import annotations

import torch

from mistral_lightning.kernels.attention_dispatch import ATTENTION_PATHS, attention_case
from mistral_lightning.kernels.documents import AttentionMetadata
from mistral_lightning.kernels.sdpa_attention import sdpa


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    *,
    document_ids: torch.Tensor | None = None,
    metadata: AttentionMetadata | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Runs the path `kernels.attention_dispatch.ATTENTION_PATHS` names for these arguments, each with its
    own tuning defaults (call a path directly to set them).

    Give the packed documents as `document_ids`, or as the `metadata` the model builds once per batch and
    passes to every layer, so that what the device kernels derive from them is computed once per batch.
    """
    if metadata is None:
        metadata = AttentionMetadata(document_ids)
    elif document_ids is not None:
        raise ValueError("give document_ids or metadata (which carries them), not both")
    case = attention_case(q, window, metadata.document_ids, backend)
    path = ATTENTION_PATHS[case]
    if case.backend == "portable":
        return path(q, k, v, window, document_ids=metadata.document_ids)
    return path(q, k, v, window, metadata=metadata)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over [B, T, H, D] tensors with an explicit bool mask broadcastable to [B, Hq, Tq, Tk]."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # The CPU's half-precision SDPA kernel is slow for a few queries over a cache, slower than upcasting
        # to fp32, which is also more exact (benchmarks/results/kernel_choices.md).
        return sdpa(q.float(), k.float(), v.float(), mask).to(q.dtype)
    return sdpa(q, k, v, mask)
