"""FlexAttention, the CUDA path where flash-attn cannot run: on the CPU (forward only: PyTorch implements no
CPU backward for it), its sliding-window block mask equals dense attention with the band written out
(helpers.attention), for windows inside and beyond the sequence, no window, packed documents, and a
context-parallel shard's queries over [halo + own] keys; once compiled, so that the fused kernel's block
skipping is what is checked, not only the eager path's dense mask."""

from __future__ import annotations

import pytest
import torch
from helpers.attention import dense_reference, packed_documents, random_qkv

from mistral_lightning.kernels import sliding_window_attention
from mistral_lightning.kernels.documents import AttentionMetadata
from mistral_lightning.kernels.flex_attention import flex_halo_attention, sliding_window_block_mask
from mistral_lightning.kernels.halo_attention import halo_attention

SEQ = 48
# torch's fp32 and bf16 tolerances against the float64 reference, as the other kernels' tests use.
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1.3e-6), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _inputs(dtype):
    q, k, v = (x.detach() for x in random_qkv(SEQ))
    return q, k, v, (q.to(dtype), k.to(dtype), v.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [5, 16, 64, None], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_flex_attention_equals_dense_attention(dtype, window, packed):
    q, k, v, cast = _inputs(dtype)
    documents = packed_documents(SEQ) if packed else None
    out = sliding_window_attention(*cast, window, document_ids=documents, backend="flex")
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, window, documents), **TOLERANCES[dtype])


@pytest.mark.parametrize("window", [5, 30, None], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_flex_halo_attention_equals_the_dense_rows_of_its_shard(window, packed):
    """Shard 2 of 4 (positions 24..35): its queries over the keys its window reaches before it and its own."""
    q, k, v, cast = _inputs(torch.float32)
    documents = packed_documents(SEQ) if packed else None
    expected = dense_reference(q, k, v, window, documents)[:, 24:36]
    halo = 24 if window is None else min(window - 1, 24)
    keys = slice(24 - halo, 36)
    metadata = AttentionMetadata(None if documents is None else documents[:, keys])
    out = halo_attention(cast[0][:, 24:36], cast[1][:, keys], cast[2][:, keys], window, halo,
                         metadata=metadata, backend="flex")  # fmt: skip
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])


@pytest.mark.processes  # inductor runs the C++ compiler
def test_compiled_flex_attention_skips_only_masked_blocks(monkeypatch):
    """The compiled kernel reads the block mask's sparsity (the eager path applies the mask densely): over 384
    positions in FlexAttention's blocks of 128, window 20 leaves each query block's first key block out, and
    documents (boundaries at 100, 128 and 250 in row 0, 200 in row 1) cut the rest."""
    import torch._inductor.config

    import mistral_lightning.kernels.flex_attention as flex

    monkeypatch.setattr(flex, "flex_attention", torch.compile(flex.flex_attention, dynamic=False))
    q, k, v = (x.detach() for x in random_qkv(384))
    documents = torch.zeros(2, 384, dtype=torch.long)
    for boundary in (100, 128, 250):
        documents[0, boundary:] += 1
    documents[1, 200:] += 1
    metadata = AttentionMetadata(documents)
    with torch._inductor.config.patch(compile_threads=1):  # no pool of compile worker processes
        out = flex_halo_attention(q.float(), k.float(), v.float(), 20, 0, metadata=metadata)
    block_mask = sliding_window_block_mask(metadata, 20, 0, q.float(), k.float())  # the one the call built
    assert block_mask.kv_num_blocks.min() < 3  # some key blocks are skipped
    torch.testing.assert_close(
        out.double(), dense_reference(q, k, v, 20, documents), **TOLERANCES[torch.float32]
    )
