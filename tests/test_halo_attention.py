"""Attention of one context-parallel shard over [halo + own] keys equals the rows of dense attention over the
whole sequence (the definition written out in helpers.attention), on the portable path and on the NPU path
against the strict fake torch_npu, for windows shorter and longer than a shard, no window, and packed
documents whose boundaries fall on shard edges and inside the halo."""

from __future__ import annotations

import pytest
import torch
from helpers.attention import dense_reference, packed_documents, random_qkv
from helpers.fake_torch_npu import install

from mistral_lightning.kernels.documents import AttentionMetadata
from mistral_lightning.kernels.halo_attention import halo_attention, halo_varlen_layout

SHARDS, SHARD = 4, 12


def _halo(window: int | None, rank: int) -> int:
    return rank * SHARD if window is None else min(window - 1, rank * SHARD)


def _shard_outputs(q, k, v, window, documents, backend):
    outputs = []
    for rank in range(SHARDS):
        start, end = rank * SHARD, (rank + 1) * SHARD
        halo = _halo(window, rank)
        ids = None if documents is None else documents[:, start - halo : end]
        outputs.append(
            halo_attention(
                q[:, start:end],
                k[:, start - halo : end],
                v[:, start - halo : end],
                window,
                halo,
                metadata=AttentionMetadata(ids),
                backend=backend,
            )
        )
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("window", [5, 12, 13, 30, None], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_portable_shards_equal_dense_attention_and_its_gradients(window, packed):
    q, k, v = random_qkv(SHARDS * SHARD)
    documents = packed_documents(SHARDS * SHARD) if packed else None
    expected = dense_reference(q, k, v, window, documents)
    got = _shard_outputs(q, k, v, window, documents, "portable")
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    have = torch.autograd.grad(got, (q, k, v), grad)
    for ours, theirs in zip(have, want):
        torch.testing.assert_close(ours, theirs)


def test_a_halo_shifted_by_one_position_is_caught():
    q, k, v = random_qkv(SHARDS * SHARD)
    expected = dense_reference(q, k, v, 8)
    start, end, halo = SHARD, 2 * SHARD, 7
    shifted = halo_attention(
        q[:, start:end], k[:, start - halo - 1 : end - 1], v[:, start - halo - 1 : end - 1], 8, halo,
        metadata=AttentionMetadata(None), backend="portable",
    )  # fmt: skip
    assert not torch.allclose(shifted, expected[:, start:end])


@pytest.mark.parametrize("window", [5, 30, None], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("packed", [False, True], ids=["BSND", "TND"])
def test_npu_shards_equal_dense_attention(monkeypatch, window, packed):
    fake = install(monkeypatch)
    q, k, v = (x.detach().float() for x in random_qkv(SHARDS * SHARD))
    documents = packed_documents(SHARDS * SHARD) if packed else None
    expected = dense_reference(q, k, v, window, documents)
    got = _shard_outputs(q, k, v, window, documents, "npu")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    layouts = {arguments["input_layout"] for name, arguments in fake.calls if name == "npu_fusion_attention"}
    assert layouts == {"TND" if packed else "BSND"}


def test_the_varlen_layout_keeps_only_the_halo_of_the_first_document():
    """Hand count: halo 4 of ids [0 0 1 1 | 1 1 2 2 2 2]: the shard's first document (1) keeps 2 halo keys."""
    ids = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2]])
    layout = halo_varlen_layout(ids, halo=4)
    assert layout.query_lengths == [2, 4] and layout.key_lengths == [4, 4]
    assert layout.kept_keys.tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
