"""Causal sliding-window attention, exact on every backend.

Layout everywhere: q [B, T, Hq, D], k/v [B, T, Hkv, D] (Hq a multiple of Hkv, GQA), output [B, T, Hq, D].
Semantics (identical to HF transformers): query i sees key j iff i - window < j <= i. With
`document_ids` [B, T], a query additionally sees only keys of its own document (packed samples).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mistral_lightning.kernels.backend import cpu_has_bf16_matmul, resolve_backend, torch_npu
from mistral_lightning.kernels.banded_attention import banded_cpu_attention
from mistral_lightning.kernels.masks import additive_mask, band_mask

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
    if _banded_cpu_kernel_applies(q, window):
        return banded_cpu_attention(q, k, v, window, document_ids=document_ids, block=block_size)
    return blocked_sdpa_attention(q, k, v, window, document_ids=document_ids, block_size=block_size)


def _banded_cpu_kernel_applies(q: torch.Tensor, window: int | None) -> bool:
    """bf16 on a CPU with native bf16 matmuls, past the first window (below it, SDPA's causal kernel skips
    the upper triangle and was faster: 12 vs 19 ms at T = W = 512). In fp32 the banded kernel's plain matmuls
    were 1.8x slower than SDPA's flash kernel."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and window is not None
        and q.shape[1] > window
        and cpu_has_bf16_matmul()
    )


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over [B, T, H, D] tensors with an explicit bool mask broadcastable to [B, Hq, Tq, Tk]."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # The CPU's half-precision SDPA kernel is slow for a few queries over a cache: one decoded token
        # over 512 cached keys took 445 us in bf16 against 93 us upcast to fp32 (which is also more exact).
        return _sdpa(q.float(), k.float(), v.float(), mask).to(q.dtype)
    return _sdpa(q, k, v, mask)


def default_block_size(window: int) -> int:
    """Query block of the banded attention: a block of B queries meets B + W - 1 keys, of which each query
    needs W, so smaller blocks waste less of the score matrix, down to where the per-block matmuls get too
    small to run well: 256 beat 128 and 512 on CPU at W = 512, T = 2K and 8K."""
    return max(16, min(window, 256))


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
    score matrix is at most block x (block + window - 1) whatever T is.
    """
    seq_len = q.shape[1]
    if document_ids is None and (window is None or seq_len <= window):
        return _sdpa(q, k, v, None, is_causal=True)
    if window is None:
        return _looped_attention(q, k, v, document_ids, block_size or seq_len)
    return _banded_attention(q, k, v, window, document_ids, block_size or default_block_size(window))


def _sdpa(q, k, v, mask, is_causal=False):
    """SDPA on [B, T, H, D] tensors (GQA handled natively by the kernel, without repeating k/v)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _band_and_documents(document_ids, q_start, q_end, k_start, k_end, window, positions):
    mask = band_mask(positions[q_start:q_end], positions[k_start:k_end], window)
    if document_ids is None:
        return mask
    same_doc = document_ids[:, q_start:q_end, None] == document_ids[:, None, k_start:k_end]
    return (mask & same_doc)[:, None]


def _banded_attention(q, k, v, window, document_ids, block):
    """Sliding-window attention with all full interior query blocks in one batched SDPA call.

    The head (queries whose window reaches before position 0) and a ragged tail are separate calls.
    Interior block i meets the keys `unfold` selects, an overlapping view of k/v (no copy), and all
    interior blocks share one [block, block + window - 1] band mask. Compared with one call per block
    this avoids a zero-filled full-size gradient per k/v slice and a mask conversion per call; the
    queries are `split`, whose backward is one concatenation.
    """
    batch, seq_len = q.shape[:2]
    positions = torch.arange(seq_len, device=q.device)
    head = min(seq_len, -(-(window - 1) // block) * block)
    num_blocks = (seq_len - head) // block
    body_end = head + num_blocks * block
    q_head, q_body, q_tail = q.split([head, body_end - head, seq_len - body_end], dim=1)
    outputs = []
    if document_ids is None and head <= window:  # no key of the head is out of the window
        outputs.append(_sdpa(q_head, k[:, :head], v[:, :head], None, is_causal=True))
    else:
        head_mask = _band_and_documents(document_ids, 0, head, 0, head, window, positions)
        outputs.append(_sdpa(q_head, k[:, :head], v[:, :head], additive_mask(head_mask, q.dtype)))
    if num_blocks:
        key_start, keys = head - window + 1, block + window - 1

        def windows(x):  # [B, nb*block + W - 1, ...] -> [B * nb, keys, ...], overlapping
            return x[:, key_start:body_end].unfold(1, keys, block).movedim(-1, 2).flatten(0, 1)

        mask = band_mask(positions[window - 1 : window - 1 + block], positions[:keys], window)
        if document_ids is not None:
            doc_q = document_ids[:, head:body_end].reshape(batch * num_blocks, block, 1)
            mask = (mask & (doc_q == windows(document_ids)[:, None, :]))[:, None]
        body = _sdpa(
            q_body.reshape(batch * num_blocks, block, *q.shape[2:]),
            windows(k),
            windows(v),
            additive_mask(mask, q.dtype),
        )
        outputs.append(body.reshape(batch, num_blocks * block, *q.shape[2:]))
    if body_end < seq_len:
        key_start = body_end - window + 1
        tail_mask = _band_and_documents(
            document_ids, body_end, seq_len, key_start, seq_len, window, positions
        )
        outputs.append(_sdpa(q_tail, k[:, key_start:], v[:, key_start:], additive_mask(tail_mask, q.dtype)))
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def _looped_attention(q, k, v, document_ids, block):
    """Causal attention within documents and no window: query block [s, e) meets keys [0, e)."""
    seq_len = q.shape[1]
    positions = torch.arange(seq_len, device=q.device)
    outputs = []
    for start in range(0, seq_len, block):
        end = min(start + block, seq_len)
        mask = _band_and_documents(document_ids, start, end, 0, end, None, positions)
        outputs.append(_sdpa(q[:, start:end], k[:, :end], v[:, :end], mask))
    return torch.cat(outputs, dim=1)


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
