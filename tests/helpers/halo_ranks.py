"""Run on gloo ranks (helpers.processes.run_on_ranks): one layer's context-parallel attention over the shard of
this rank (contiguous or zig-zag, as the DataModules cut it), its output and q/k/v gradients with the positions
they belong to, gathered for the comparison with dense attention on one process; several cases, and the
exchange's byte count, in one start of the ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mistral_lightning.distributed import context_shard_slices, zigzag_context_shards
from mistral_lightning.kernels.documents import AttentionMetadata
from mistral_lightning.training.context_parallel import HaloAttention


def shard_attention(q, k, v, window, documents, grad):
    rank, size, seq = dist.get_rank(), dist.get_world_size(), q.shape[1]
    slices = context_shard_slices(seq, rank, size, zigzag_context_shards(window, seq, size))
    positions = torch.cat([torch.arange(seq)[part] for part in slices])
    leaves = [x[:, positions].detach().clone().requires_grad_() for x in (q, k, v)]
    metadata = AttentionMetadata(None if documents is None else documents[:, positions])
    out = HaloAttention(dist.group.WORLD)(*leaves, window, metadata=metadata)
    out.backward(grad[:, positions])
    # numpy arrays travel back by value (tensors would by a shared-memory handle that dies with the rank)
    return positions.numpy(), out.detach().numpy(), [leaf.grad.numpy() for leaf in leaves]


def cases_on_ranks(cases: list[tuple], count_bytes: tuple | None = None) -> dict:
    """`shard_attention(*case)` for each case, and `count_received(*count_bytes)` if given."""
    from mistral_lightning.benchmarks.context_parallel_halo import count_received

    return {
        "cases": [shard_attention(*case) for case in cases],
        "bytes": None if count_bytes is None else count_received(*count_bytes),
    }
