"""Attention of one context-parallel shard over its halo and its own keys, exact on every backend.

q [B, T, Hq, D] are the shard's queries; k/v [B, halo + T, Hkv, D] are the `halo` keys just before the shard
(received from the ranks before it) followed by the shard's own. Query i sits at key position halo + i, so it
sees keys j with halo + i - window < j <= halo + i and, with packed documents, only keys of its own document.
The metadata's `document_ids` cover the keys: [B, halo + T], the queries' being the last T columns.

Every device kernel counts its causal or band mask from the bottom-right corner of the [T, halo + T] score
matrix, which is exactly this offset: flash-attn's `causal=True` with `window_size=(W - 1, 0)`, and
`npu_fusion_attention`'s sparse_mode 4 (band, `pre_tockens=W - 1`, `next_tockens=0`) or 3 (causal);
FlexAttention's mask_mod places query i at key position halo + i (kernels/flex_attention.py). With
packed documents the halo keys of other documents are dropped before the varlen call (their queries are on
other ranks), so each document is one sequence whose keys are its queries plus the halo part of the first.
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import torch

from mistral_lightning.kernels.backend import resolve_backend, torch_npu
from mistral_lightning.kernels.documents import AttentionMetadata
from mistral_lightning.kernels.flash_attention import flash_window_size
from mistral_lightning.kernels.flex_attention import flex_halo_attention
from mistral_lightning.kernels.masks import additive_mask, band_mask
from mistral_lightning.kernels.npu_attention import NPU_MAX_VARLEN_SEQUENCES, band_arguments
from mistral_lightning.kernels.sdpa_attention import default_band_query_block, sdpa


def blocked_sdpa_halo(q, k, v, window, halo, *, metadata: AttentionMetadata, query_block=None):
    """The portable path. With a window, as `blocked_sdpa_band`: query blocks of `query_block` (default
    `default_band_query_block(window)`) in one batched SDPA call, block j meeting the B + W - 1 keys its window
    reaches (an overlapping `unfold` view), all blocks sharing one band mask. Keys are padded on the left up to a
    halo of W - 1 (padding masked) and queries on the right up to whole blocks (their rows dropped). Without a
    window: one call over every key, with an explicit causal mask."""
    if window is None:
        return _causal_over_halo(q, k, v, halo, metadata.document_ids)
    batch, seq_len = q.shape[:2]
    block = query_block or default_band_query_block(window)
    blocks = -(-seq_len // block)
    left = max(0, window - 1 - halo)  # keys before the first one, so that every block's window exists
    right = blocks * block - seq_len
    documents = metadata.document_ids
    if left or right:
        k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, left, right)) for x in (k, v))
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, right))
        if documents is not None:
            documents = torch.nn.functional.pad(documents, (left, right), value=-2)
    halo += left
    keys = block + window - 1

    def windows(
        x,
    ):  # [B, halo + nb*block, ...] -> [B * nb, keys, ...], overlapping, block j from halo + j*block - W + 1
        return x[:, halo - window + 1 :].unfold(1, keys, block).movedim(-1, 2).flatten(0, 1)

    positions = torch.arange(keys, device=q.device)
    mask = band_mask(positions[window - 1 :], positions, window)  # [block, keys], the same for every block
    # Block b's key t is padded key halo - (W - 1) + b*block + t: the left padding is invisible.
    first_key = halo - (window - 1) + torch.arange(blocks, device=q.device)[:, None] * block
    valid = first_key + positions[None, :] >= left  # [nb, keys]
    mask = (mask[None] & valid[:, None, :]).repeat(batch, 1, 1)  # [B * nb, block, keys]
    if documents is not None:
        doc_q = documents[:, halo:].reshape(batch * blocks, block, 1)
        mask = mask & (doc_q == windows(documents)[:, None, :])
    out = sdpa(
        q.reshape(batch * blocks, block, *q.shape[2:]),
        windows(k),
        windows(v),
        additive_mask(mask[:, None], q.dtype),
    )
    return out.reshape(batch, blocks * block, *q.shape[2:])[:, :seq_len]


def _causal_over_halo(q, k, v, halo, documents):
    """Every query over all keys up to its own position (no window): one SDPA call with an explicit mask."""
    positions = torch.arange(halo + q.shape[1], device=q.device)
    mask = band_mask(positions[halo:], positions, None)
    if documents is not None:
        mask = (mask & (documents[:, halo:, None] == documents[:, None, :]))[:, None]
    return sdpa(q, k, v, additive_mask(mask, q.dtype))


class HaloVarlenLayout(NamedTuple):
    """The batch flattened for the varlen kernels: which flattened keys are kept, and each document's
    query and key counts (rows batch-major, documents in order)."""

    kept_keys: torch.Tensor  # int64 indices into the [B * (halo + T)] flattened keys, on the device
    query_lengths: list[int]
    key_lengths: list[int]


def halo_varlen_layout(document_ids: torch.Tensor, halo: int) -> HaloVarlenLayout:
    """From the keys' document ids [B, halo + T] (one device-to-host copy)."""
    ids = document_ids.cpu()
    batch, width = ids.shape
    kept, query_lengths, key_lengths = [], [], []
    for row in range(batch):
        local = ids[row, halo:]
        starts = torch.ones_like(local, dtype=torch.bool)
        starts[1:] = local[1:] != local[:-1]
        bounds = [*torch.nonzero(starts).squeeze(-1).tolist(), len(local)]
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        # The halo keys of the shard's first document: the halo's trailing run of its id.
        halo_ids = ids[row, :halo]
        differs = torch.nonzero(halo_ids != local[0]).squeeze(-1)
        shared = halo - (int(differs[-1]) + 1 if len(differs) else 0)
        kept.append(torch.arange(row * width + halo - shared, (row + 1) * width))
        query_lengths += lengths
        key_lengths += [lengths[0] + shared, *lengths[1:]]
    return HaloVarlenLayout(torch.cat(kept).to(document_ids.device), query_lengths, key_lengths)


def _layout(metadata: AttentionMetadata, halo: int, device: torch.device) -> HaloVarlenLayout:
    return metadata.derived(
        ("halo_varlen", halo, device), lambda: halo_varlen_layout(metadata.document_ids, halo)
    )


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def flash_halo_attention(q, k, v, window, halo, *, metadata: AttentionMetadata):
    """flash_attn_func: its causal window is counted from the bottom-right corner, i.e. after the halo."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=True, window_size=flash_window_size(window))


def flash_halo_attention_varlen(q, k, v, window, halo, *, metadata: AttentionMetadata):
    """flash_attn_varlen_func, each document one sequence whose keys may start in the halo."""
    from flash_attn import flash_attn_varlen_func

    layout = _layout(metadata, halo, q.device)
    cu_q = torch.tensor([0, *accumulate(layout.query_lengths)], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, *accumulate(layout.key_lengths)], dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(
        _flat(q),
        _flat(k)[layout.kept_keys],
        _flat(v)[layout.kept_keys],
        cu_q,
        cu_k,
        max(layout.query_lengths),
        max(layout.key_lengths),
        causal=True,
        window_size=flash_window_size(window),
    )
    return out.reshape(q.shape)


def npu_halo_attention(q, k, v, window, halo, *, metadata: AttentionMetadata):
    """BSND: Sq = T, Skv = halo + T; band mode 4 (or causal mode 3) counts from the bottom-right corner."""
    arguments = band_arguments(q, window, metadata)
    return torch_npu().npu_fusion_attention(q, k, v, input_layout="BSND", **arguments)[0]


def npu_halo_attention_varlen(q, k, v, window, halo, *, metadata: AttentionMetadata):
    """TND with actual_seq_qlen / actual_seq_kvlen per document, in calls of at most 1024 documents."""
    arguments = band_arguments(q, window, metadata)
    layout = _layout(metadata, halo, q.device)
    flat_q, flat_k, flat_v = _flat(q), _flat(k)[layout.kept_keys], _flat(v)[layout.kept_keys]
    outputs, q_start, k_start = [], 0, 0
    for first in range(0, len(layout.query_lengths), NPU_MAX_VARLEN_SEQUENCES):
        q_ends = list(accumulate(layout.query_lengths[first : first + NPU_MAX_VARLEN_SEQUENCES]))
        k_ends = list(accumulate(layout.key_lengths[first : first + NPU_MAX_VARLEN_SEQUENCES]))
        outputs.append(
            torch_npu().npu_fusion_attention(
                flat_q[q_start : q_start + q_ends[-1]],
                flat_k[k_start : k_start + k_ends[-1]],
                flat_v[k_start : k_start + k_ends[-1]],
                input_layout="TND",
                actual_seq_qlen=q_ends,
                actual_seq_kvlen=k_ends,
                **arguments,
            )[0]
        )
        q_start, k_start = q_start + q_ends[-1], k_start + k_ends[-1]
    return torch.cat(outputs).reshape(q.shape)


HALO_PATHS = {
    ("portable", False): blocked_sdpa_halo,
    ("portable", True): blocked_sdpa_halo,
    ("flash", False): flash_halo_attention,
    ("flash", True): flash_halo_attention_varlen,
    ("flex", False): flex_halo_attention,
    ("flex", True): flex_halo_attention,
    ("npu", False): npu_halo_attention,
    ("npu", True): npu_halo_attention_varlen,
}


def halo_attention(q, k, v, window, halo, *, metadata: AttentionMetadata, backend: str | None = None):
    """Attention of the shard's queries over [halo + own] keys (see the module doc); the path by backend and
    whether documents are packed."""
    if window is not None and window <= 0:
        raise ValueError(f"sliding window must be positive or None, got {window}")
    if k.shape[1] != halo + q.shape[1]:
        raise ValueError(f"keys {k.shape[1]} != halo {halo} + queries {q.shape[1]}")
    path = HALO_PATHS[resolve_backend(q, backend), metadata.document_ids is not None]
    return path(q, k, v, window, halo, metadata=metadata)
