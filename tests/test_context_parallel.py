"""Context parallelism: halo attention on 2 and 4 gloo ranks equals dense attention over the whole sequence
on one process (outputs and every q/k/v gradient), for windows inside one shard, spanning several (multi-hop),
no window (the whole prefix), and packed documents with boundaries on shard edges."""

from __future__ import annotations

import pytest
import torch
from helpers.attention import dense_reference, random_qkv
from helpers.halo_ranks import shard_attention
from helpers.processes import run_on_ranks

from mistral_lightning.training.context_parallel import halo_length, hop_sizes

SEQ = 48


def _documents() -> torch.Tensor:
    rows = torch.zeros(2, SEQ, dtype=torch.long)
    for boundary in (12, 24, 30):
        rows[0, boundary:] += 1
    rows[1, 20:] += 1
    return rows


@pytest.mark.processes
@pytest.mark.parametrize(
    "ranks, window, packed",
    [(2, 5, False), (2, None, True), (4, 5, True), (4, 30, False), (4, 30, True), (4, None, False)],
    ids=[
        "cp2-w5",
        "cp2-nowindow-packed",
        "cp4-w5-packed",
        "cp4-w30-multihop",
        "cp4-w30-packed",
        "cp4-nowindow",
    ],
)
def test_halo_attention_on_ranks_equals_dense_attention(ranks, window, packed):
    q, k, v = random_qkv(SEQ)
    documents = _documents() if packed else None
    expected = dense_reference(q, k, v, window, documents)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    results = run_on_ranks(shard_attention, q, k, v, window, documents, grad, world_size=ranks)
    torch.testing.assert_close(
        torch.cat([torch.from_numpy(out) for out, _ in results], dim=1), expected.detach()
    )
    for index, name in enumerate("qkv"):
        got = torch.cat([torch.from_numpy(grads[index]) for _, grads in results], dim=1)
        torch.testing.assert_close(got, want[index], msg=lambda m, name=name: f"d{name}: {m}")


def test_hop_sizes_by_hand():
    """Shards of 12: W=5 needs 4 positions from the previous rank; W=30 needs 29: 12 + 12 + 5 over 3 hops;
    no window, or W reaching the first shard from the last, sends whole shards to every later rank."""
    assert hop_sizes(5, 12, 4) == [4]
    assert hop_sizes(30, 12, 4) == [12, 12, 5]
    assert hop_sizes(None, 12, 4) == [12, 12, 12]
    assert hop_sizes(37, 12, 4) == [12, 12, 12]
    assert [halo_length(30, 12, rank) for rank in range(4)] == [0, 12, 24, 29]
