"""The few cross-rank questions the application asks outside the parallel plan: who am I, who are my
data-parallel peers, and what did every rank produce."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

from mistral_lightning.errors import UserError

T = TypeVar("T")


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def data_parallel_layout(strategy: Any) -> tuple[int, int]:
    """(replicas, replica rank) of a Lightning strategy; tensor-parallel peers share a replica rank."""
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
    replicas = kwargs.get("num_replicas", getattr(strategy, "world_size", 1))
    return int(replicas), int(kwargs.get("rank", getattr(strategy, "global_rank", 0)))


def context_parallel_layout(strategy: Any) -> tuple[int, int]:
    """(size, rank) of context parallelism: each rank of it holds one shard of every sequence
    (training/context_parallel.py); (1, 0) for a strategy without it."""
    layout = getattr(strategy, "context_parallel_layout", None)
    return (1, 0) if layout is None else layout


def zigzag_context_shards(window: int | None, seq_length: int, size: int) -> bool:
    """Whether a sequence is split zig-zag (rank r holds chunks r and 2·size - 1 - r of 2·size) rather than into
    contiguous shards: when the last shard's queries reach the whole prefix (no window, or W - 1 ≥ the positions
    before it). Contiguous shards would then give rank r a causal workload growing with r; zig-zag gives every
    rank the same. With a shorter window every contiguous shard past the first W - 1 positions has the same work."""
    return size > 1 and (window is None or window - 1 >= (size - 1) * (seq_length // size))


def context_shard_slices(seq_length: int, rank: int, size: int, zigzag: bool) -> tuple[slice, ...]:
    """The positions of rank `rank`'s shard, in the order it holds them."""
    parts = 2 * size if zigzag else size
    if seq_length % parts:
        raise UserError(
            f"a batch of {seq_length} positions cannot be split into {parts} equal parts for "
            f"context_parallel_size={size}; make data.init_args.seq_length a multiple of {parts}"
        )
    length = seq_length // parts
    chunks = (rank, parts - 1 - rank) if zigzag else (rank,)
    return tuple(slice(chunk * length, (chunk + 1) * length) for chunk in chunks)


def context_shard(batch: dict[str, Any], rank: int, size: int, window: int | None) -> dict[str, Any]:
    """Rank `rank`'s shard of every [B, T] tensor of a batch, zig-zag or contiguous as `zigzag_context_shards`
    decides for the model's `window` (our datasets always give position ids, so the shard keeps the global ones)."""
    input_ids = batch["input_ids"]
    seq_len = input_ids.shape[1]
    slices = context_shard_slices(seq_len, rank, size, zigzag_context_shards(window, seq_len, size))

    def shard(value: torch.Tensor) -> torch.Tensor:
        return (
            torch.cat([value[:, part] for part in slices], dim=1) if len(slices) > 1 else value[:, slices[0]]
        )

    return {
        key: shard(value) if isinstance(value, torch.Tensor) and value.shape[:2] == input_ids.shape else value
        for key, value in batch.items()
    }


def gather_unique(items: list[T], key: Callable[[T], Hashable]) -> list[T]:
    """Every rank's items on every rank, one per key (tensor-parallel peers produce the same ones),
    sorted by key."""
    if rank_and_world_size()[1] > 1:
        shards: list[list[T] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shards, items)
        items = [item for shard in shards for item in shard]
    return sorted({key(item): item for item in items}.values(), key=key)
