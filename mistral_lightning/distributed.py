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
    """(size, rank) of context parallelism: each rank of it holds one contiguous shard of every sequence
    (training/context_parallel.py); (1, 0) for a strategy without it."""
    layout = getattr(strategy, "context_parallel_layout", None)
    return (1, 0) if layout is None else layout


def context_shard(batch: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
    """Rank `rank`'s contiguous shard of every [B, T] tensor of a batch (our datasets always give position ids,
    so the shard keeps the global ones)."""
    input_ids = batch["input_ids"]
    seq_len = input_ids.shape[1]
    if seq_len % size:
        raise UserError(
            f"a batch of {seq_len} positions cannot be split into context_parallel_size={size} equal shards; "
            "make data.init_args.seq_length a multiple of it"
        )
    shard = seq_len // size
    return {
        key: value[:, rank * shard : (rank + 1) * shard]
        if isinstance(value, torch.Tensor) and value.shape[:2] == input_ids.shape
        else value
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
