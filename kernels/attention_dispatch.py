"""Which implementation runs `sliding_window_attention`: one table from the case to the path.

A case is what the choice depends on:
- backend: "npu" | "flash" | "flex" | "portable", from `kernels.backend.resolve_backend` (device, what is installed,
  or the `backend=` / MISTRAL_LIGHTNING_KERNELS override);
- cpu_bf16: bf16 tensors on a CPU whose oneDNN multiplies bf16 natively (only the portable backend reads it);
- span: "causal" (no window), "within_window" (T <= W: no key ever falls out) or "beyond_window" (T > W);
- documents: packed documents (`document_ids` given).
The portable paths are called as `path(q, k, v, window, document_ids=...)`, the device paths as
`path(q, k, v, window, metadata=...)` (kernels.documents.AttentionMetadata: the batch's documents and what
the kernels derive from them once per batch); each name says what the path is. Why each portable choice
wins where it does: benchmarks/results/kernel_choices.md.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product
from typing import NamedTuple

import torch

from mistral_lightning.kernels.backend import BACKENDS, cpu_has_bf16_matmul, resolve_backend
from mistral_lightning.kernels.banded_attention import banded_cpu_attention
from mistral_lightning.kernels.flash_attention import flash_attention, flash_attention_varlen
from mistral_lightning.kernels.flex_attention import flex_sliding_window_attention
from mistral_lightning.kernels.npu_attention import npu_fusion_attention, npu_fusion_attention_varlen
from mistral_lightning.kernels.sdpa_attention import (
    blocked_sdpa_band,
    blocked_sdpa_causal_documents,
    sdpa_causal,
)

RESOLVED_BACKENDS = tuple(backend for backend in BACKENDS if backend != "auto")
SPANS = ("causal", "within_window", "beyond_window")


class AttentionCase(NamedTuple):
    backend: str
    cpu_bf16: bool
    span: str
    documents: bool


AttentionPath = Callable[..., torch.Tensor]

# The portable backend by (cpu_bf16, span, documents). Causal SDPA is exact while no key leaves the window;
# past it, the banded kernel where the CPU multiplies bf16 natively (in bf16 it beats SDPA's CPU flash
# kernel with an explicit mask; in fp32 and within the first window it does not), blocked SDPA elsewhere.
_PORTABLE: dict[tuple[bool, str, bool], AttentionPath] = {
    (False, "causal", False): sdpa_causal,
    (False, "causal", True): blocked_sdpa_causal_documents,
    (False, "within_window", False): sdpa_causal,
    (False, "within_window", True): blocked_sdpa_band,
    (False, "beyond_window", False): blocked_sdpa_band,
    (False, "beyond_window", True): blocked_sdpa_band,
    (True, "causal", False): sdpa_causal,
    (True, "causal", True): blocked_sdpa_causal_documents,
    (True, "within_window", False): sdpa_causal,
    (True, "within_window", True): blocked_sdpa_band,
    (True, "beyond_window", False): banded_cpu_attention,
    (True, "beyond_window", True): banded_cpu_attention,
}
# The device kernels take every span and dtype themselves; packed documents change only their layout (for
# FlexAttention, only its block mask).
_DEVICE: dict[tuple[str, bool], AttentionPath] = {
    ("flex", False): flex_sliding_window_attention,
    ("flex", True): flex_sliding_window_attention,
    ("npu", False): npu_fusion_attention,
    ("npu", True): npu_fusion_attention_varlen,
    ("flash", False): flash_attention,
    ("flash", True): flash_attention_varlen,
}

ATTENTION_PATHS: dict[AttentionCase, AttentionPath] = {
    AttentionCase(backend, cpu_bf16, span, documents): (
        _PORTABLE[cpu_bf16, span, documents] if backend == "portable" else _DEVICE[backend, documents]
    )
    for backend, cpu_bf16, span, documents in product(RESOLVED_BACKENDS, (False, True), SPANS, (False, True))
}


def attention_case(
    q: torch.Tensor, window: int | None, document_ids: torch.Tensor | None = None, backend: str | None = None
) -> AttentionCase:
    """The table key of attention over q [B, T, H, D]."""
    if window is not None and window <= 0:
        raise ValueError(f"sliding window must be positive or None, got {window}")
    seq_len = q.shape[1]
    span = "causal" if window is None else "within_window" if seq_len <= window else "beyond_window"
    cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16 and cpu_has_bf16_matmul()
    return AttentionCase(resolve_backend(q, backend), cpu_bf16, span, document_ids is not None)


def attention_path(
    q: torch.Tensor, window: int | None, document_ids: torch.Tensor | None = None, backend: str | None = None
) -> str:
    """The name of the implementation `sliding_window_attention` runs for these arguments."""
    return ATTENTION_PATHS[attention_case(q, window, document_ids, backend)].__name__
