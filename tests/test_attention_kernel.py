"""The portable SDPA sliding-window attention paths against a dense masked reference."""

from __future__ import annotations

import pytest
import torch
from helpers.attention import dense_reference, peak_allocated_bytes, random_qkv

from mistral_lightning.kernels import sliding_window_attention
from mistral_lightning.kernels.sdpa_attention import blocked_sdpa_band, blocked_sdpa_causal_documents

WINDOW = 8


def blocked_sdpa(q, k, v, window, document_ids=None, query_block=None):
    """The blocked SDPA path for a window or none, with `query_block` queries per block."""
    if window is None:
        return blocked_sdpa_causal_documents(q, k, v, document_ids=document_ids, query_block=query_block)
    return blocked_sdpa_band(q, k, v, window, document_ids=document_ids, query_block=query_block)


@pytest.mark.parametrize("seq_len", [1, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW + 5])
@pytest.mark.parametrize("query_block", [None, 5])
def test_forward_and_backward_match_dense(seq_len, query_block):
    q, k, v = random_qkv(seq_len)
    if query_block is None:  # whichever path the dispatcher picks
        out = sliding_window_attention(q, k, v, WINDOW, backend="portable")
    else:  # the band path with small blocks, also where the dispatcher would take causal SDPA
        out = blocked_sdpa_band(q, k, v, WINDOW, query_block=query_block)
    expected = dense_reference(q, k, v, WINDOW)
    torch.testing.assert_close(out, expected)

    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad_out)
    theirs = torch.autograd.grad(expected, (q, k, v), grad_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("window", [None, 3, WINDOW])
@pytest.mark.parametrize("query_block", [None, 5])
def test_document_ids_keep_attention_inside_each_document(window, query_block):
    seq_len = 21
    q, k, v = random_qkv(seq_len)
    document_ids = torch.tensor([[0] * 6 + [1] * 9 + [2] * 6, [0] * 21])
    if query_block is None:
        out = sliding_window_attention(q, k, v, window, document_ids=document_ids, backend="portable")
    else:
        out = blocked_sdpa(q, k, v, window, document_ids, query_block)
    torch.testing.assert_close(out, dense_reference(q, k, v, window, document_ids))


def test_no_window_is_plain_causal():
    q, k, v = random_qkv(19)
    torch.testing.assert_close(
        sliding_window_attention(q, k, v, None, backend="portable"), dense_reference(q, k, v, None)
    )


def test_memory_per_token_is_flat_in_sequence_length():
    window = 64

    def forward_backward(seq_len):
        def run():
            q, k, v = (torch.randn(1, seq_len, h, 32, requires_grad=True) for h in (4, 2, 2))
            sliding_window_attention(q, k, v, window, backend="portable").sum().backward()

        return run

    short = peak_allocated_bytes(forward_backward(2 * window)) / (2 * window)
    long = peak_allocated_bytes(forward_backward(16 * window)) / (16 * window)
    # A dense [T, T] mask or score matrix would make the long case ~8x worse per token.
    assert long < 1.5 * short, (short, long)
