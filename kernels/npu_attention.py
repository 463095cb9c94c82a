"""The Ascend paths: torch_npu's npu_fusion_attention, in the batch layout and the packed-document one."""

from __future__ import annotations

import math

import torch

from mistral_lightning.kernels.backend import torch_npu
from mistral_lightning.kernels.documents import cumulative_lengths

# Ascend's band mode takes a compressed 2048x2048 upper-triangular mask instead of a full [T, T] one.
_NPU_COMPRESSED_MASK_SIZE = 2048


def _band_arguments(q: torch.Tensor, window: int | None) -> dict:
    """The arguments both layouts share: heads, the compressed mask, the band and the softmax scale."""
    mask = torch.triu(
        torch.ones(_NPU_COMPRESSED_MASK_SIZE, _NPU_COMPRESSED_MASK_SIZE, dtype=torch.bool, device=q.device), 1
    )
    # Band mode with pre_tockens = W - 1 gives exactly W visible keys (ModelLink's W lets in W + 1);
    # without a window, mode 3 (bottom-right causal) is plain causal attention.
    band = {"sparse_mode": 4, "pre_tockens": window - 1, "next_tockens": 0} if window else {"sparse_mode": 3}
    return dict(
        head_num=q.shape[2], atten_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]), keep_prob=1.0, **band
    )


def npu_fusion_attention(q, k, v, window, *, document_ids=None):
    """Layout BSND: every row one sequence (document_ids is not used)."""
    return torch_npu().npu_fusion_attention(q, k, v, input_layout="BSND", **_band_arguments(q, window))[0]


def npu_fusion_attention_varlen(q, k, v, window, *, document_ids):
    """Layout TND: the batch flattened to tokens, each document its own sequence."""
    batch, seq_len = q.shape[:2]
    ends = cumulative_lengths(document_ids)[1:].tolist()
    out = torch_npu().npu_fusion_attention(
        *(x.reshape(batch * seq_len, *x.shape[2:]) for x in (q, k, v)),
        input_layout="TND",
        actual_seq_qlen=ends,
        actual_seq_kvlen=ends,
        **_band_arguments(q, window),
    )[0]
    return out.reshape(q.shape)
