"""The CPU banded attention kernel against a dense masked reference, under torch.compile, and its memory."""

from __future__ import annotations

import pytest
import torch
from helpers.attention import dense_reference, peak_allocated_bytes, random_qkv

from mistral_lightning.kernels import banded_attention, sliding_window_attention
from mistral_lightning.kernels.banded_attention import banded_cpu_attention


def assert_matches_dense(q, k, v, window, block, document_ids=None, **tolerance):
    out = banded_cpu_attention(q, k, v, window, document_ids=document_ids, query_block=block)
    expected = dense_reference(*(x.double() for x in (q, k, v)), window, document_ids)
    torch.testing.assert_close(out.double(), expected, **tolerance)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad_out)
    theirs = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype or a.dtype == q.dtype
        torch.testing.assert_close(a.double(), b.double(), **tolerance)


@pytest.mark.parametrize(
    "seq_len, window, block",
    [
        (1, 8, 4),  # shorter than one block
        (9, 8, 4),  # a ragged last block
        (29, 8, 5),  # window not a multiple of the block
        (40, 8, 8),
        (33, 3, 4),  # window smaller than the block
        (21, 1, 4),  # each query sees only itself
        (50, 8, 64),  # one block longer than the sequence
    ],
)
def test_matches_dense_attention_forward_and_backward(seq_len, window, block):
    assert_matches_dense(*random_qkv(seq_len), window, block)


def test_chunked_blocks_match_dense(monkeypatch):
    # Chunks of two 4-query blocks: the head blocks, then several body chunks and a short last one.
    monkeypatch.setattr(banded_attention, "CHUNK_QUERIES", 8)
    assert_matches_dense(*random_qkv(45), 8, 4)


def test_one_query_head_per_kv_head_and_batch_rows_stay_separate():
    q, k, v = random_qkv(26, heads=2, kv_heads=2, batch=3)
    assert_matches_dense(q, k, v, 6, 4)


@pytest.mark.parametrize("window", [3, 8])
def test_documents_keep_attention_inside_each_document(window, monkeypatch):
    monkeypatch.setattr(banded_attention, "CHUNK_QUERIES", 8)
    seq_len = 29
    document_ids = torch.tensor(
        [[0] * 6 + [1] * 9 + [2] * 10 + [-1] * 4, [0] * 29]  # -1: padding, as the SFT collator writes it
    )
    assert_matches_dense(*random_qkv(seq_len), window, 4, document_ids)


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_through_the_dispatcher_matches_dense_within_bf16_rounding(packed):
    # Whichever kernel this CPU dispatches bf16 to (the banded one needs native bf16 matmuls), past the window.
    q, k, v = (x.detach().to(torch.bfloat16).requires_grad_() for x in random_qkv(70, heads=4, head_dim=32))
    document_ids = torch.tensor([[0] * 30 + [1] * 40, [0] * 50 + [1] * 20]) if packed else None
    out = sliding_window_attention(q, k, v, 16, document_ids=document_ids)
    expected = dense_reference(*(x.double() for x in (q, k, v)), 16, document_ids)
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_custom_ops_pass_torch_library_checks():
    q, k, v = random_qkv(19)
    documents = torch.tensor([[0] * 7 + [1] * 12] * 2)
    for document_ids in (None, documents):
        torch.library.opcheck(banded_attention._banded_attention_forward, (q, k, v, document_ids, 8, 4))
        # The backward op runs inside autograd's backward pass (no double backward): plain tensors.
        inputs = [torch.randn_like(q)] + [x.detach() for x in (q, k, v)]
        torch.library.opcheck(banded_attention._banded_attention_backward, (*inputs, document_ids, 8, 4))


def test_compiled_calls_the_same_kernels_without_graph_breaks():
    q, k, v = (x.detach().to(torch.bfloat16).requires_grad_() for x in random_qkv(40, head_dim=32))

    def attention(q, k, v):
        return banded_cpu_attention(q, k, v, 8, query_block=4)

    compiled = torch.compile(attention, fullgraph=True, dynamic=False)
    grad_out = torch.randn_like(q)
    eager_out = attention(q, k, v)
    compiled_out = compiled(q, k, v)
    torch.testing.assert_close(compiled_out, eager_out, atol=0, rtol=0)
    eager_grads = torch.autograd.grad(eager_out, (q, k, v), grad_out)
    compiled_grads = torch.autograd.grad(compiled_out, (q, k, v), grad_out)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_memory_per_token_is_flat_in_sequence_length(monkeypatch):
    window = 64
    monkeypatch.setattr(banded_attention, "CHUNK_QUERIES", 4 * window)

    def forward_backward(seq_len):
        def run():
            q, k, v = (torch.randn(1, seq_len, h, 32, requires_grad=True) for h in (4, 2, 2))
            banded_cpu_attention(q, k, v, window).sum().backward()

        return run

    short = peak_allocated_bytes(forward_backward(4 * window)) / (4 * window)
    long = peak_allocated_bytes(forward_backward(32 * window)) / (32 * window)
    # Saved probabilities or unchunked scores would make the long case several times worse per token.
    assert long < 1.5 * short, (short, long)
