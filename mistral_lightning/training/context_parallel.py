"""Context parallelism by halo exchange: each rank of the `context_parallel` mesh dimension holds a contiguous
shard of every sequence, and attention gets from the ranks before it only the keys/values its window reaches.

With window W and shard length T, a query of rank r at global position p needs keys p - W + 1 .. p, so the rank
needs the last min(W - 1, r·T) positions before its shard: its halo. When W - 1 > T the halo spans several
ranks, so it arrives in hops: in hop j every rank sends its last `hop_sizes[j - 1]` positions to rank + j.
Without a window (or W - 1 ≥ the positions before the last shard) the same exchange sends every shard to
every later rank, which is the exact, unbalanced all-gather of the causal prefix.

Forward: `HaloExchange` sends and receives the K/V halo point-to-point (one batched isend/irecv per hop) and
`kernels.halo_attention` runs banded attention over [halo + own] keys. Backward: the halo's dK/dV go back to
the ranks that own those positions, the same hops reversed, and are added to their own gradients. The halo's
document ids go the same way once per batch, so packed documents stay exact across shard edges.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mistral_lightning.kernels.documents import AttentionMetadata
from mistral_lightning.kernels.halo_attention import halo_attention


def hop_sizes(window: int | None, shard_length: int, context_parallel_size: int) -> list[int]:
    """Positions each rank sends to rank + j in hop j (index j - 1): all of them except the first hop's."""
    if window is None or window - 1 >= (context_parallel_size - 1) * shard_length:
        return [shard_length] * (context_parallel_size - 1)
    hops = min(context_parallel_size - 1, math.ceil((window - 1) / shard_length))
    return [min(shard_length, window - 1 - (hop - 1) * shard_length) for hop in range(1, hops + 1)]


def halo_length(window: int | None, shard_length: int, rank: int) -> int:
    """Positions before rank `rank`'s shard that its queries reach (0 on the first rank)."""
    before = rank * shard_length
    return before if window is None else min(window - 1, before)


def halo_bytes_per_layer(
    window: int | None, shard_length: int, context_parallel_size: int, rank: int, position_bytes: int
) -> int:
    """Bytes rank `rank` receives per layer forward for its K/V halo (`position_bytes`: K + V of one position)."""
    return halo_length(window, shard_length, rank) * position_bytes


def _exchange(
    tensor: torch.Tensor, sizes: list[int], dim: int, group: Any, *, backward: bool = False
) -> list[torch.Tensor]:
    """Hop j sends `tensor`'s last sizes[j-1] positions (along `dim`) to rank + j and receives as many from
    rank - j; returns the received pieces ordered by source rank (farthest first). With `backward`, `tensor`
    holds the received pieces' gradients, concatenated in that order, and each goes back to its source."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = tensor.shape[dim]
    received: dict[int, torch.Tensor] = {}
    operations = []
    incoming = [hop for hop in range(1, len(sizes) + 1) if rank - hop >= 0]
    offsets = {}
    start = 0
    for hop in reversed(incoming):  # the farthest source first, as the pieces are concatenated
        offsets[hop] = start
        start += sizes[hop - 1]
    for hop, size in enumerate(sizes, start=1):
        if not backward:
            send_to, receive_from = rank + hop, rank - hop
            piece = tensor.narrow(dim, shard - size, size) if send_to < world else None
        else:
            send_to, receive_from = rank - hop, rank + hop
            piece = tensor.narrow(dim, offsets[hop], size) if send_to >= 0 else None
        if piece is not None:
            peer = dist.get_global_rank(group, send_to)
            operations.append(dist.P2POp(dist.isend, piece.contiguous(), peer, group))
        if 0 <= receive_from < world:
            shape = list(tensor.shape)
            shape[dim] = size
            received[hop] = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            peer = dist.get_global_rank(group, receive_from)
            operations.append(dist.P2POp(dist.irecv, received[hop], peer, group))
    if operations:
        for request in dist.batch_isend_irecv(operations):
            request.wait()
    order = sorted(received, reverse=not backward)
    return [received[hop] for hop in order]


class HaloExchange(torch.autograd.Function):
    """local [..., T (at `dim`), ...] -> the halo before it; backward returns the halo's gradient to its owners."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], dim: int, group: Any) -> torch.Tensor:
        ctx.sizes, ctx.dim, ctx.group, ctx.shape = sizes, dim, group, local.shape
        pieces = _exchange(local, sizes, dim, group)
        if not pieces:
            shape = list(local.shape)
            shape[dim] = 0
            return local.new_empty(shape)
        return torch.cat(pieces, dim=dim)

    @staticmethod
    def backward(ctx, grad_halo: torch.Tensor):
        returned = _exchange(grad_halo.contiguous(), ctx.sizes, ctx.dim, ctx.group, backward=True)
        grad = grad_halo.new_zeros(ctx.shape)
        shard = ctx.shape[ctx.dim]
        for piece in returned:  # hop j's piece is the gradient of this shard's last sizes[j-1] positions
            grad.narrow(ctx.dim, shard - piece.shape[ctx.dim], piece.shape[ctx.dim]).add_(piece)
        return grad, None, None, None


class HaloAttention:
    """What `Attention.attention_fn` becomes under context parallelism (`apply_context_parallel`)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, q, k, v, window, *, metadata: AttentionMetadata) -> torch.Tensor:
        shard = q.shape[1]
        sizes = hop_sizes(window, shard, self.size)
        halo_kv = HaloExchange.apply(torch.stack((k, v)), sizes, 2, self.group)
        halo = halo_kv.shape[2]
        keys = torch.cat((halo_kv[0], k), dim=1)
        values = torch.cat((halo_kv[1], v), dim=1)
        with_halo = metadata.derived(
            ("context_parallel_halo", window), lambda: self._metadata(metadata, sizes)
        )
        return halo_attention(q, keys, values, window, halo, metadata=with_halo)

    def _metadata(self, metadata: AttentionMetadata, sizes: list[int]) -> AttentionMetadata:
        """The keys' documents, [halo + own], exchanged once per batch (every layer has the same halo)."""
        documents = metadata.document_ids
        if documents is None:
            return AttentionMetadata(None)
        with torch.no_grad():
            pieces = _exchange(documents, sizes, 1, self.group)
        return AttentionMetadata(torch.cat([*pieces, documents], dim=1))


def apply_context_parallel(model: nn.Module, group: Any) -> None:
    """Every attention layer exchanges halos over `group` (the mesh's context_parallel dimension)."""
    attention = HaloAttention(group)
    for layer in model.layers:
        layer.attn.attention_fn = attention
