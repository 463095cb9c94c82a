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
        sizes = hop_sizes(window, shard, self.size)
        # Once per batch and before any K/V message, so the two kinds of message never interleave.
        with_halo = metadata.derived(
            ("context_parallel_halo", window), lambda: self._metadata(metadata, sizes)
        )
        if window is not None and len(sizes) == 1 and sizes[0] < shard:
            return self._overlapped(q, k, v, window, sizes[0], metadata, with_halo)
        halo_kv = HaloExchange.apply(_stacked_tail(k, v, sizes[0] if sizes else 0), sizes, 2, self.group)
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
