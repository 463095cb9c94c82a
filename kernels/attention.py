"""Causal sliding-window attention, exact on every backend.

Layout everywhere: q [B, T, Hq, D], k/v [B, T, Hkv, D] (Hq a multiple of Hkv, GQA), output [B, T, Hq, D].
Semantics (identical to HF transformers): query i sees key j iff i - window < j <= i. With
`document_ids` [B, T], a query additionally sees only keys of its own document (packed samples).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mistral_lightning.kernels.backend import resolve_backend, torch_npu

# Ascend's band mode takes a compressed 2048x2048 upper-triangular mask instead of a full [T, T] one.
_NPU_COMPRESSED_MASK_SIZE = 2048


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    *,
    document_ids: torch.Tensor | None = None,
    backend: str | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    if window is not None and window <= 0:
        raise ValueError(f"sliding window must be positive or None, got {window}")
    chosen = resolve_backend(q, backend)
    if chosen == "npu":
        return _npu_attention(q, k, v, window, document_ids)
    if chosen == "flash":
        return _flash_attention(q, k, v, window, document_ids)
    return blocked_sdpa_attention(q, k, v, window, document_ids=document_ids, block_size=block_size)


def band_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [Tq, Tk]: True where query position i may attend key position j."""
    diff = query_positions[:, None] - key_positions[None, :]
    visible = diff >= 0
    if window is not None:
        visible &= diff < window
    return visible


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over [B, T, H, D] tensors with an explicit bool mask broadcastable to [B, Hq, Tq, Tk]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def blocked_sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    *,
    document_ids: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Portable exact attention whose memory is linear in T for a fixed window.

    Queries are split into blocks; a block [s, e) only meets keys [s - window + 1, e), so each
    SDPA call is at most block x (block + window - 1) whatever T is.
    """
    seq_len = q.shape[1]
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if document_ids is None and (window is None or seq_len <= window):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
        return out.transpose(1, 2)
    block = block_size or (window if window is not None else seq_len)
    positions = torch.arange(seq_len, device=q.device)
    outputs = []
    for start in range(0, seq_len, block):
        end = min(start + block, seq_len)
        key_start = 0 if window is None else max(0, start - window + 1)
        mask = band_mask(positions[start:end], positions[key_start:end], window)
        if document_ids is not None:
            same_doc = document_ids[:, start:end, None] == document_ids[:, None, key_start:end]
            mask = (mask & same_doc)[:, None]
        outputs.append(
            F.scaled_dot_product_attention(
                qt[:, :, start:end],
                kt[:, :, key_start:end],
                vt[:, :, key_start:end],
                attn_mask=mask,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2)


def _cumulative_lengths(document_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries of a [B, T] id tensor, flattened batch-major: cumulative ends, starting at 0."""
    batch, seq_len = document_ids.shape
    changes = torch.ones_like(document_ids, dtype=torch.bool)
    changes[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.nonzero(changes.reshape(-1)).squeeze(-1)
    ends = torch.cat((starts[1:], starts.new_tensor([batch * seq_len])))
    return torch.cat((starts.new_zeros(1), ends)).to(torch.int32)


def _flash_attention(q, k, v, window, document_ids):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window_size = (-1, 0) if window is None else (window - 1, 0)
    if document_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    batch, seq_len = q.shape[:2]
    cu_seqlens = _cumulative_lengths(document_ids)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_attn_varlen_func(
        q.reshape(batch * seq_len, *q.shape[2:]),
        k.reshape(batch * seq_len, *k.shape[2:]),
        v.reshape(batch * seq_len, *v.shape[2:]),
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        causal=True,
        window_size=window_size,
    )
    return out.reshape(q.shape)


def _npu_attention(q, k, v, window, document_ids):
    npu = torch_npu()
    head_dim = q.shape[-1]
    mask = torch.triu(
        torch.ones(_NPU_COMPRESSED_MASK_SIZE, _NPU_COMPRESSED_MASK_SIZE, dtype=torch.bool, device=q.device), 1
    )
    # Band mode with pre_tockens = W - 1 gives exactly W visible keys (ModelLink's W lets in W + 1);
    # without a window, mode 3 (bottom-right causal) is plain causal attention.
    band = {"sparse_mode": 4, "pre_tockens": window - 1, "next_tockens": 0} if window else {"sparse_mode": 3}
    common = dict(
        head_num=q.shape[2], atten_mask=mask, scale=1.0 / math.sqrt(head_dim), keep_prob=1.0, **band
    )
    if document_ids is None:
        return npu.npu_fusion_attention(q, k, v, input_layout="BSND", **common)[0]
    batch, seq_len = q.shape[:2]
    ends = _cumulative_lengths(document_ids)[1:].tolist()
    out = npu.npu_fusion_attention(
        q.reshape(batch * seq_len, *q.shape[2:]),
        k.reshape(batch * seq_len, *k.shape[2:]),
        v.reshape(batch * seq_len, *v.shape[2:]),
        input_layout="TND",
        actual_seq_qlen=ends,
        actual_seq_kvlen=ends,
        **common,
    )[0]
    return out.reshape(q.shape)
