"""The portable paths: PyTorch's scaled_dot_product_attention, whole or over query blocks.

Exact on any device, with memory linear in T for a fixed window: a block of queries [s, e) only meets
keys [s - window + 1, e), so each score matrix is at most query_block x (query_block + window - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_lightning.kernels.masks import additive_mask, band_mask


def sdpa(q, k, v, mask, is_causal=False):
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


def sdpa_causal(q, k, v, window=None, *, document_ids=None):
    """One causal SDPA call: exact when no key falls out of the window (T <= W, or no window) and the
    sequence is one document; the dispatch table picks it only then."""
    return sdpa(q, k, v, None, is_causal=True)


def default_band_query_block(window: int) -> int:
    """`blocked_sdpa_band`'s queries per block: a block of B queries meets B + W - 1 keys, of which each
    query needs W, so smaller blocks waste less of the score matrix, down to where the per-block matmuls get
    too small to run well (benchmarks/results/kernel_choices.md)."""
    return max(16, min(window, 256))


def _band_and_documents(document_ids, q_start, q_end, k_start, k_end, window, positions):
    mask = band_mask(positions[q_start:q_end], positions[k_start:k_end], window)
    if document_ids is None:
        return mask
    same_doc = document_ids[:, q_start:q_end, None] == document_ids[:, None, k_start:k_end]
    return (mask & same_doc)[:, None]


def blocked_sdpa_band(q, k, v, window, *, document_ids=None, query_block=None):
    """Sliding-window attention, packed documents optional, with all full interior query blocks in one
    batched SDPA call; `query_block` queries per block (default `default_band_query_block(window)`).

    The head (queries whose window reaches before position 0) and a ragged tail are separate calls.
    Interior block i meets the keys `unfold` selects, an overlapping view of k/v (no copy), and all
    interior blocks share one [block, block + window - 1] band mask. Compared with one call per block
    this avoids a zero-filled full-size gradient per k/v slice and a mask conversion per call; the
    queries are `split`, whose backward is one concatenation.
    """
    block = query_block or default_band_query_block(window)
    batch, seq_len = q.shape[:2]
    positions = torch.arange(seq_len, device=q.device)
    head = min(seq_len, -(-(window - 1) // block) * block)
    num_blocks = (seq_len - head) // block
    body_end = head + num_blocks * block
    q_head, q_body, q_tail = q.split([head, body_end - head, seq_len - body_end], dim=1)
    outputs = []
    if document_ids is None and head <= window:  # no key of the head is out of the window
        outputs.append(sdpa(q_head, k[:, :head], v[:, :head], None, is_causal=True))
    else:
        head_mask = _band_and_documents(document_ids, 0, head, 0, head, window, positions)
        outputs.append(sdpa(q_head, k[:, :head], v[:, :head], additive_mask(head_mask, q.dtype)))
    if num_blocks:
        key_start, keys = head - window + 1, block + window - 1

        def windows(x):  # [B, nb*block + W - 1, ...] -> [B * nb, keys, ...], overlapping
            return x[:, key_start:body_end].unfold(1, keys, block).movedim(-1, 2).flatten(0, 1)

        mask = band_mask(positions[window - 1 : window - 1 + block], positions[:keys], window)
        if document_ids is not None:
            doc_q = document_ids[:, head:body_end].reshape(batch * num_blocks, block, 1)
            mask = (mask & (doc_q == windows(document_ids)[:, None, :]))[:, None]
        body = sdpa(
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
        outputs.append(sdpa(q_tail, k[:, key_start:], v[:, key_start:], additive_mask(tail_mask, q.dtype)))
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def blocked_sdpa_causal_documents(q, k, v, window=None, *, document_ids, query_block=None):
    """Causal attention within documents and no window: query block [s, e) meets keys [0, e), with a
    same-document mask; `query_block` queries per block (default: the whole sequence, one call)."""
    seq_len = q.shape[1]
    block = query_block or seq_len
    positions = torch.arange(seq_len, device=q.device)
    outputs = []
    for start in range(0, seq_len, block):
        end = min(start + block, seq_len)
        mask = _band_and_documents(document_ids, start, end, 0, end, None, positions)
        outputs.append(sdpa(q[:, start:end], k[:, :end], v[:, :end], mask))
    return torch.cat(outputs, dim=1)
