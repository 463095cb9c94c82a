"""Context parallelism: each rank of the `context_parallel` mesh dimension holds a shard of every sequence, and
attention gets from the other ranks only the keys/values its queries reach.

With a window W shorter than the positions before the last shard, shards are contiguous (`distributed.
context_shard`) and a query of rank r at global position p needs keys p - W + 1 .. p, so the rank needs the last
min(W - 1, r·T) positions before its shard: its halo. When W - 1 > T the halo spans several ranks, so it arrives
in hops: in hop j every rank sends its last `hop_sizes[j - 1]` positions to rank + j. `HaloExchange` sends and
receives the K/V halo point-to-point (one batched isend/irecv per hop) and `kernels.halo_attention` runs banded
attention over [halo + own] keys. Backward: the halo's dK/dV go back to the ranks that own those positions, the
same hops reversed, and are added to their own gradients. The halo's document ids go the same way once per
batch, so packed documents stay exact across shard edges.

Without a window (or W - 1 reaching the first shard from the last) every query may need every earlier key, and
contiguous shards would give rank r (2r + 1)/CP² of the causal work. Then the sequence is split zig-zag
(rank r holds chunks r and 2·CP - 1 - r of 2·CP, which balances the work exactly), K/V are all-gathered
(`ZigzagGather`; backward reduce-scatters their gradient to the owners), and each of the two chunks attends over
the keys before it within the window.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mistral_lightning.distributed import context_shard_slices, zigzag_context_shards
from mistral_lightning.kernels.documents import AttentionMetadata
from mistral_lightning.kernels.halo_attention import halo_attention


def hop_sizes(window: int, shard_length: int) -> list[int]:
    """Positions each rank sends to rank + j in hop j (index j - 1) for a window the halo exchange serves
    (not `zigzag_context_shards`): whole shards, then the rest of W - 1."""
    hops = math.ceil((window - 1) / shard_length)
    return [min(shard_length, window - 1 - (hop - 1) * shard_length) for hop in range(1, hops + 1)]


def halo_length(window: int | None, shard_length: int, rank: int) -> int:
    """Positions before rank `rank`'s shard that its queries reach (0 on the first rank)."""
    before = rank * shard_length
    return before if window is None else min(window - 1, before)


class _Posted:
    """Point-to-point operations under way: the receive buffers by hop, and what must live until they finish."""

    def __init__(self) -> None:
        self.received: dict[int, torch.Tensor] = {}
        self.requests: list[Any] = []
        self.sent: list[torch.Tensor] = []  # kept alive until the sends complete

    def wait(self) -> None:
        for request in self.requests:
            request.wait()
        self.requests, self.sent = [], []


def _post(tensor: torch.Tensor, sizes: list[int], dim: int, group: Any, *, backward: bool = False) -> _Posted:
    """Hop j sends `tensor`'s last sizes[j-1] positions (along `dim`) to rank + j and receives as many from
    rank - j, without waiting. With `backward`, `tensor` holds the received pieces' gradients, concatenated
    farthest source first, and each goes back to its source."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = tensor.shape[dim]
    posted, operations = _Posted(), []
    offsets, start = {}, 0
    for hop in reversed([hop for hop in range(1, len(sizes) + 1) if rank - hop >= 0]):
        offsets[hop] = start  # the farthest source first, as the pieces are concatenated
        start += sizes[hop - 1]
    for hop, size in enumerate(sizes, start=1):
        if not backward:
            send_to, receive_from = rank + hop, rank - hop
            piece = tensor.narrow(dim, shard - size, size) if send_to < world else None
        else:
            send_to, receive_from = rank - hop, rank + hop
            piece = tensor.narrow(dim, offsets[hop], size) if send_to >= 0 else None
        if piece is not None:
            posted.sent.append(piece.contiguous())
            operations.append(
                dist.P2POp(dist.isend, posted.sent[-1], dist.get_global_rank(group, send_to), group)
            )
        if 0 <= receive_from < world:
            shape = list(tensor.shape)
            shape[dim] = size
            posted.received[hop] = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            peer = dist.get_global_rank(group, receive_from)
            operations.append(dist.P2POp(dist.irecv, posted.received[hop], peer, group))
    if operations:
        posted.requests = dist.batch_isend_irecv(operations)
    return posted


def _pieces(posted: _Posted, *, backward: bool = False) -> list[torch.Tensor]:
    """The received pieces ordered by source rank, farthest first (forward) or nearest first (backward)."""
    return [posted.received[hop] for hop in sorted(posted.received, reverse=not backward)]


def _exchange(
    tensor: torch.Tensor, sizes: list[int], dim: int, group: Any, *, backward: bool = False
) -> list[torch.Tensor]:
    """`_post`, waited for: the received pieces."""
    posted = _post(tensor, sizes, dim, group, backward=backward)
    posted.wait()
    return _pieces(posted, backward=backward)


def _halo_of(pieces: list[torch.Tensor], local: torch.Tensor, dim: int) -> torch.Tensor:
    if not pieces:
        shape = list(local.shape)
        shape[dim] = 0
        return local.new_empty(shape)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _gradient_to_owners(ctx, grad_halo: torch.Tensor) -> torch.Tensor:
    """The halo's gradient back to the ranks it came from; this rank's own positions' gradient from its
    successors (hop j's piece is the gradient of this shard's last sizes[j-1] positions)."""
    returned = _exchange(grad_halo.contiguous(), ctx.sizes, ctx.dim, ctx.group, backward=True)
    grad = grad_halo.new_zeros(ctx.shape)
    shard = ctx.shape[ctx.dim]
    for piece in returned:
        grad.narrow(ctx.dim, shard - piece.shape[ctx.dim], piece.shape[ctx.dim]).add_(piece)
    return grad


class HaloExchange(torch.autograd.Function):
    """The shard's last positions (at `dim`; what the hops send) -> the halo before it; backward returns the
    halo's gradient to its owners."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], dim: int, group: Any) -> torch.Tensor:
        ctx.sizes, ctx.dim, ctx.group, ctx.shape = sizes, dim, group, local.shape
        return _halo_of(_exchange(local, sizes, dim, group), local, dim)

    @staticmethod
    def backward(ctx, grad_halo: torch.Tensor):
        return _gradient_to_owners(ctx, grad_halo), None, None, None


class HaloExchangeStart(torch.autograd.Function):
    """The one-hop exchange, posted: returns the (not yet filled) halo buffer; `HaloExchangeWait` completes it.
    Between the two, this rank computes what needs no halo. Backward as `HaloExchange`."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, size: int, dim: int, group: Any, posted: list) -> torch.Tensor:
        ctx.sizes, ctx.dim, ctx.group, ctx.shape = [size], dim, group, local.shape
        posted.append(_post(local, [size], dim, group))
        return _halo_of(_pieces(posted[-1]), local, dim)

    @staticmethod
    def backward(ctx, grad_halo: torch.Tensor):
        return _gradient_to_owners(ctx, grad_halo), None, None, None, None


class HaloExchangeWait(torch.autograd.Function):
    """Identity on the halo buffer, once its receive (and this rank's send) completed."""

    @staticmethod
    def forward(ctx, halo: torch.Tensor, posted: list) -> torch.Tensor:
        posted.pop().wait()
        return halo.view_as(halo)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _stacked_tail(k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """K and V of the shard's last `length` positions as one [2, B, length, ...] message: only what any hop sends
    (the first hop's size is the largest), not a copy of the whole shard."""
    return torch.stack((k[:, k.shape[1] - length :], v[:, v.shape[1] - length :]))


def _global_order(gathered: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """An all-gather's output [size · n, ...] of zig-zag shards (sequence at `dim`) -> the whole sequence in order:
    the ranks' first chunks, then their second chunks from the last rank back."""
    chunks = gathered.unflatten(0, (size, -1)).unflatten(dim + 1, (2, -1))
    first, second = chunks.select(dim + 1, 0), chunks.select(dim + 1, 1).flip(0)
    return torch.cat([half.movedim(0, dim).flatten(dim, dim + 1) for half in (first, second)], dim=dim)


def _rank_major(whole: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """The inverse of `_global_order`: the whole sequence -> each rank's shard, rank after rank along dim 0."""
    halves = whole.unflatten(dim, (2, size, -1))
    first = halves.select(dim, 0).movedim(dim, 0)
    second = halves.select(dim, 1).movedim(dim, 0).flip(0)
    return torch.stack((first, second), dim=dim + 1).flatten(dim + 1, dim + 2).flatten(0, 1)


def _zigzag_gather(local: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size = dist.get_world_size(group)
    gathered = local.new_empty(size * local.shape[0], *local.shape[1:])
    dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
    return _global_order(gathered, size, dim)


class ZigzagGather(torch.autograd.Function):
    """This rank's zig-zag shard (sequence at `dim`) -> the whole sequence; backward reduce-scatters the whole
    sequence's gradient, so each rank gets the sum of every rank's gradient of its own positions."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _zigzag_gather(local, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        rank_major = _rank_major(grad, size, ctx.dim).contiguous()
        own = grad.new_empty(rank_major.shape[0] // size, *rank_major.shape[1:])
        dist.reduce_scatter_tensor(own, rank_major, group=ctx.group)
        return own, None, None


class HaloAttention:
    """What `Attention.attention_fn` becomes under context parallelism (`apply_context_parallel`).

    With a window inside one shard (W - 1 < T) the exchange overlaps with attention: the queries from W - 1 on
    see only this shard's keys, so they are computed while the halo is in flight; the first W - 1 queries then
    run over [halo + the shard's first W - 1 keys]. The two query sets are disjoint, so their outputs are
    concatenated, exactly. Longer windows and windowless models exchange first, then attend.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, q, k, v, window, *, metadata: AttentionMetadata) -> torch.Tensor:
        shard = q.shape[1]
        if zigzag_context_shards(window, shard * self.size, self.size):
            return self._zigzag(q, k, v, window, metadata)
        sizes = hop_sizes(window, shard)
        # Once per batch and before any K/V message, so the two kinds of message never interleave.
        with_halo = metadata.derived(
            ("context_parallel_halo", window), lambda: self._metadata(metadata, sizes)
        )
        if len(sizes) == 1 and sizes[0] < shard:
            return self._overlapped(q, k, v, window, sizes[0], metadata, with_halo)
        halo_kv = HaloExchange.apply(_stacked_tail(k, v, sizes[0]), sizes, 2, self.group)
        halo = halo_kv.shape[2]
        keys = torch.cat((halo_kv[0], k), dim=1)
        values = torch.cat((halo_kv[1], v), dim=1)
        return halo_attention(q, keys, values, window, halo, metadata=with_halo)

    def _overlapped(self, q, k, v, window, size, metadata, with_halo) -> torch.Tensor:
        posted: list = []
        halo_kv = HaloExchangeStart.apply(_stacked_tail(k, v, size), size, 2, self.group, posted)
        # Queries size.. see keys 0.. of this shard only: as if the first `size` keys were their halo.
        interior = halo_attention(q[:, size:], k, v, window, size, metadata=metadata)
        halo_kv = HaloExchangeWait.apply(halo_kv, posted)
        halo = halo_kv.shape[2]
        keys = torch.cat((halo_kv[0], k[:, :size]), dim=1)
        values = torch.cat((halo_kv[1], v[:, :size]), dim=1)
        boundary_metadata = metadata.derived(
            ("context_parallel_boundary", window),
            lambda: AttentionMetadata(
                None if with_halo.document_ids is None else with_halo.document_ids[:, : halo + size]
            ),
        )
        boundary = halo_attention(q[:, :size], keys, values, window, halo, metadata=boundary_metadata)
        return torch.cat((boundary, interior), dim=1)

    def _zigzag(self, q, k, v, window, metadata) -> torch.Tensor:
        """Each of the shard's two chunks over the keys before it (within the window) of the gathered sequence."""
        chunk = q.shape[1] // 2
        kv = ZigzagGather.apply(torch.stack((k, v)), 2, self.group)
        documents = metadata.derived(
            ("context_parallel_zigzag", window), lambda: self._gathered_documents(metadata)
        )
        parts = context_shard_slices(
            q.shape[1] * self.size, dist.get_rank(self.group), self.size, zigzag=True
        )
        outputs = []
        for index, part in enumerate(parts):
            halo = part.start if window is None else min(window - 1, part.start)
            keys = slice(part.start - halo, part.stop)
            chunk_metadata = documents.derived(
                ("context_parallel_zigzag_chunk", index, halo),
                partial(_key_documents, documents, keys),
            )
            queries = q[:, index * chunk : (index + 1) * chunk]
            outputs.append(
                halo_attention(queries, kv[0][:, keys], kv[1][:, keys], window, halo, metadata=chunk_metadata)
            )
        return torch.cat(outputs, dim=1)

    def _gathered_documents(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """The whole sequence's document ids, gathered once per batch."""
        if metadata.document_ids is None:
            return AttentionMetadata(None)
        with torch.no_grad():
            return AttentionMetadata(_zigzag_gather(metadata.document_ids, 1, self.group))

    def _metadata(self, metadata: AttentionMetadata, sizes: list[int]) -> AttentionMetadata:
        """The keys' documents, [halo + own], exchanged once per batch (every layer has the same halo)."""
        documents = metadata.document_ids
        if documents is None:
            return AttentionMetadata(None)
        with torch.no_grad():
            pieces = _exchange(documents, sizes, 1, self.group)
        return AttentionMetadata(torch.cat([*pieces, documents], dim=1))


def _key_documents(documents: AttentionMetadata, keys: slice) -> AttentionMetadata:
    return AttentionMetadata(None if documents.document_ids is None else documents.document_ids[:, keys])


def apply_context_parallel(model: nn.Module, group: Any) -> None:
    """Every attention layer exchanges halos over `group` (the mesh's context_parallel dimension)."""
    attention = HaloAttention(group)
    for layer in model.layers:
        layer.attn.attention_fn = attention
