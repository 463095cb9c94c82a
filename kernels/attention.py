"""Causal sliding-window attention, exact on every backend, and the decoding step's masked attention.

Layout everywhere: q [B, T, Hq, D], k/v [B, T, Hkv, D] (Hq a multiple of Hkv, GQA), output [B, T, Hq, D].
Semantics (identical to HF transformers): query i sees key j iff i - window < j <= i (kernels.masks.band_mask).
With `document_ids` [B, T], a query additionally sees only keys of its own document (packed samples).
"""

from __future__ import annotations

import torch

from mistral_lightning.kernels.attention_dispatch import ATTENTION_PATHS, attention_case
from mistral_lightning.kernels.sdpa_attention import sdpa


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    *,
    document_ids: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Runs the path `kernels.attention_dispatch.ATTENTION_PATHS` names for these arguments, each with its
    own tuning defaults (call a path directly to set them)."""
    path = ATTENTION_PATHS[attention_case(q, window, document_ids, backend)]
    return path(q, k, v, window, document_ids=document_ids)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over [B, T, H, D] tensors with an explicit bool mask broadcastable to [B, Hq, Tq, Tk]."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # The CPU's half-precision SDPA kernel is slow for a few queries over a cache, slower than upcasting
        # to fp32, which is also more exact (benchmarks/results/kernel_choices.md).
        return sdpa(q.float(), k.float(), v.float(), mask).to(q.dtype)
    return sdpa(q, k, v, mask)
