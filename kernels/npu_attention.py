"""The Ascend paths: torch_npu's npu_fusion_attention, in the batch layout and the packed-document one."""

from __future__ import annotations

import math
from itertools import accumulate

import torch

from mistral_lightning.kernels.backend import torch_npu
from mistral_lightning.kernels.documents import AttentionMetadata

# Ascend's band mode takes a compressed 2048x2048 upper-triangular mask instead of a full [T, T] one.
NPU_COMPRESSED_MASK_SIZE = 2048
# The TND (varlen) layout takes at most this many sequences per call (actual_seq_qlen's documented limit).
NPU_MAX_VARLEN_SEQUENCES = 1024


def compressed_mask(device: torch.device) -> torch.Tensor:
    """The mask of band and causal modes: True above the diagonal (masked), 2048 x 2048 whatever T is."""
    size = NPU_COMPRESSED_MASK_SIZE
    return torch.triu(torch.ones(size, size, dtype=torch.bool, device=device), 1)


def varlen_calls(
    lengths: list[int], limit: int = NPU_MAX_VARLEN_SEQUENCES
) -> list[tuple[int, int, list[int]]]:
    """The documents split into calls of at most `limit` sequences: (first token, end token, cumulative lengths
    within the call). Documents are independent, so attention per call is attention over all of them."""
    calls, start = [], 0
    for first in range(0, len(lengths), limit):
        ends = list(accumulate(lengths[first : first + limit]))
        calls.append((start, start + ends[-1], ends))
        start += ends[-1]
    return calls


def band_arguments(q: torch.Tensor, window: int | None, metadata: AttentionMetadata) -> dict:
    """The arguments both layouts share: heads, the batch's compressed mask, the band and the softmax scale."""
    mask = metadata.derived(("npu_compressed_mask", q.device), lambda: compressed_mask(q.device))
    # Band mode with pre_tockens = W - 1 gives exactly W visible keys (ModelLink's W lets in W + 1);
    # without a window, mode 3 (bottom-right causal) is plain causal attention.
    band = {"sparse_mode": 4, "pre_tockens": window - 1, "next_tockens": 0} if window else {"sparse_mode": 3}
    return dict(
        head_num=q.shape[2], atten_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]), keep_prob=1.0, **band
    )


def npu_fusion_attention(q, k, v, window, *, metadata: AttentionMetadata):
    """Layout BSND: every row one sequence (the metadata's documents are not used)."""
    arguments = band_arguments(q, window, metadata)
    return torch_npu().npu_fusion_attention(q, k, v, input_layout="BSND", **arguments)[0]


def npu_fusion_attention_varlen(q, k, v, window, *, metadata: AttentionMetadata):
    """Layout TND: the batch flattened to tokens, each document its own sequence, in as many calls as the
    1024-sequence limit needs."""
    batch, seq_len = q.shape[:2]
    arguments = band_arguments(q, window, metadata)
    calls = metadata.derived("npu_varlen_calls", lambda: varlen_calls(metadata.document_lengths()))
    flat = [x.reshape(batch * seq_len, *x.shape[2:]) for x in (q, k, v)]
    outputs = [
        torch_npu().npu_fusion_attention(
            *(x[start:end] for x in flat),
            input_layout="TND",
            actual_seq_qlen=ends,
            actual_seq_kvlen=ends,
            **arguments,
        )[0]
        for start, end, ends in calls
    ]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.reshape(q.shape)
