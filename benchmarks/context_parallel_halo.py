"""Bytes each rank receives per attention layer under context parallelism: the halo exchange against an
all-gather of the same K/V, measured from the real calls on gloo ranks and computed for Mistral-7B.

    python -P -m mistral_lightning.benchmarks.context_parallel_halo [--ranks 4] [--seq 4096] [--window 512]

Measured: `--ranks` gloo processes run one layer's halo attention (forward and backward) on a shard each;
every point-to-point receive the exchange posts is counted (its tensor's bytes), and checked against
`halo_length × bytes per position` (forward) and the same again (the gradient returned in backward).
Computed: for the 7B (8 KV heads × 128, bf16; /8 under TP8) at 64K and 128K on CP 2..16, the last rank's
halo (the largest) against what an all-gather of K/V hands every rank ((CP - 1) shards); and the attention work
of the busiest rank over the mean (query-key pairs inside the window, counted over the positions each rank holds
in `distributed.context_shard_slices`), contiguous against zig-zag shards, windowless (v0.2) and with W = 4096.
Writes benchmarks/results/context_parallel_halo.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mistral_lightning.benchmarks.common import RESULTS_DIR, machine, save_json
from mistral_lightning.config import MistralConfig
from mistral_lightning.distributed import context_shard_slices
from mistral_lightning.kernels.documents import AttentionMetadata
from mistral_lightning.training.context_parallel import HaloAttention, halo_length

SEVEN_B = MistralConfig.from_name("mistral-7b-32k")
BF16_BYTES = 2


def position_bytes(kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """K and V of one position."""
    return 2 * kv_heads * head_dim * element_bytes


def received_bytes_per_layer(window: int | None, seq: int, ranks: int, rank: int, per_position: int) -> dict:
    """Rank `rank`'s bytes received per layer forward: its halo, and an all-gather's (CP - 1) shards."""
    shard = seq // ranks
    return {
        "halo": halo_length(window, shard, rank) * per_position,
        "all_gather": (ranks - 1) * shard * per_position,
    }


def count_received(seq: int, window: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """On this rank (a process group is up): one layer's forward and backward, counting the bytes posted to
    every irecv of the exchange."""
    counted = {"bytes": 0}
    original = dist.batch_isend_irecv

    def counting(operations):
        counted["bytes"] += sum(
            op.tensor.numel() * op.tensor.element_size() for op in operations if op.op is dist.irecv
        )
        return original(operations)

    rank, ranks = dist.get_rank(), dist.get_world_size()
    shard = seq // ranks
    generator = torch.Generator().manual_seed(rank)
    q = torch.randn(1, shard, heads, head_dim, generator=generator, requires_grad=True)
    k, v = (torch.randn(1, shard, kv_heads, head_dim, generator=generator, requires_grad=True) for _ in "kv")
    dist.batch_isend_irecv = counting
    try:
        out = HaloAttention(dist.group.WORLD)(q, k, v, window, metadata=AttentionMetadata(None))
        forward = counted["bytes"]
        out.sum().backward()
    finally:
        dist.batch_isend_irecv = original
    return {"rank": rank, "forward": forward, "backward": counted["bytes"] - forward}


def _worker(rank: int, ranks: int, port: int, arguments: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        results.put(count_received(*arguments))
    finally:
        dist.destroy_process_group()


def measure(
    ranks: int, seq: int, window: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 64
) -> list[dict]:
    """Every rank's counted bytes next to the formula's."""
    context = mp.get_context("spawn")
    results = context.Queue()
    arguments = (seq, window, heads, kv_heads, head_dim)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers = [
        context.Process(target=_worker, args=(rank, ranks, port, arguments, results)) for rank in range(ranks)
    ]
    for worker in workers:
        worker.start()
    rows = sorted((results.get(timeout=300) for _ in range(ranks)), key=lambda row: row["rank"])
    for worker in workers:
        worker.join()
    per_position = position_bytes(kv_heads, head_dim, 4)  # fp32 here
    for row in rows:
        row["formula"] = received_bytes_per_layer(window, seq, ranks, row["rank"], per_position)["halo"]
    return rows


def seven_b_table() -> list[dict]:
    rows = []
    for seq in (65536, 131072):
        for ranks in (2, 4, 8, 16):
            for tensor_parallel in (1, 8):
                per_position = position_bytes(
                    SEVEN_B.num_kv_heads // tensor_parallel, SEVEN_B.head_dim, BF16_BYTES
                )
                row = received_bytes_per_layer(SEVEN_B.sliding_window, seq, ranks, ranks - 1, per_position)
                rows.append(
                    {"seq": seq, "context_parallel": ranks, "tensor_parallel": tensor_parallel, **row}
                    | {"ratio": row["all_gather"] / row["halo"]}
                )
    return rows


def attention_pairs(window: int | None, seq: int, ranks: int, zigzag: bool) -> list[int]:
    """Each rank's query-key pairs: a query at position p sees min(p + 1, W) keys."""
    keys = torch.arange(1, seq + 1)
    if window is not None:
        keys = keys.clamp(max=window)
    return [
        sum(int(keys[part].sum()) for part in context_shard_slices(seq, rank, ranks, zigzag))
        for rank in range(ranks)
    ]


def balance_table() -> list[dict]:
    rows = []
    for window in (None, SEVEN_B.sliding_window):
        for seq in (65536, 131072):
            for ranks in (2, 4, 8, 16):
                row = {"window": window, "seq": seq, "context_parallel": ranks}
                for layout, zigzag in (("contiguous", False), ("zigzag", True)):
                    pairs = attention_pairs(window, seq, ranks, zigzag)
                    row[layout] = max(pairs) * ranks / sum(pairs)
                rows.append(row)
    return rows


def markdown(measured: list[dict], settings: dict, table: list[dict], balance: list[dict], where: str) -> str:
    lines = [
        "# Context parallelism: bytes received per attention layer per rank",
        "",
        f"Measured on {where}: {settings['ranks']} gloo ranks, one layer (forward + backward), sequence "
        f"{settings['seq']}, window {settings['window']}, fp32 K/V of 2 heads × 64.",
        "",
        "| rank | forward (counted) | formula | backward (counted) |",
        "|---|---|---|---|",
        *(f"| {r['rank']} | {r['forward']:,} | {r['formula']:,} | {r['backward']:,} |" for r in measured),
        "",
        "Mistral-7B (8 KV heads × 128, bf16, window 4096), the last rank (the largest halo), per layer forward:",
        "",
        "| sequence | CP | TP | halo MB | all-gather MB | all-gather / halo |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['seq'] // 1024}K | {r['context_parallel']} | {r['tensor_parallel']} | {r['halo'] / 1e6:.2f} | "
            f"{r['all_gather'] / 1e6:.1f} | {r['ratio']:.1f}× |"
            for r in table
        ),
        "",
        "Attention work of the busiest rank over the mean (query-key pairs inside the window), by how the sequence "
        "is cut; `fit` cuts zig-zag exactly when a window reaches the whole prefix or there is none:",
        "",
        "| window | sequence | CP | contiguous | zig-zag |",
        "|---|---|---|---|---|",
        *(
            f"| {r['window'] or 'none'} | {r['seq'] // 1024}K | {r['context_parallel']} | "
            f"{r['contiguous']:.3f} | {r['zigzag']:.3f} |"
            for r in balance
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args(argv)
    measured = measure(args.ranks, args.seq, args.window)
    table = seven_b_table()
    balance = balance_table()
    settings = vars(args)
    where = machine()
    save_json(
        "context_parallel_halo",
        {"machine": where, **settings, "measured": measured, "mistral_7b": table, "balance": balance},
    )
    text = markdown(measured, settings, table, balance, where["cpu"] if "cpu" in where else str(where))
    (RESULTS_DIR / "context_parallel_halo.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
