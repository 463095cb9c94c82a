"""Starting processes: a command once per rank as torchrun would (`start_ranks`), or a function on a few
gloo ranks in fresh processes (`run_on_ranks`)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def without_process_group(env: dict) -> dict:
    """`env` for a child that launches its own run: this process's in-process runs leave Lightning's
    MASTER_PORT set, with its store still listening, so a child inheriting it fails with EADDRINUSE."""
    names = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"}
    return {key: value for key, value in env.items() if key not in names}


def start_ranks(command: list[str], nprocs: int, cwd: Path, **popen) -> list[subprocess.Popen]:
    """`command` once per rank with the environment torchrun would set (Lightning sees LOCAL_RANK and joins
    the ranks over gloo), one thread each; `popen` goes to each Popen (stdout, stderr, text)."""
    port = free_port()
    environment = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nprocs),
        "NODE_RANK": "0",
    }
    return [
        subprocess.Popen(
            command,
            env={**os.environ, **environment, "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"},
            cwd=cwd,
            **popen,
        )
        for rank in range(nprocs)
    ]


def _worker(rank: int, world_size: int, port: int, target, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, target(*args)))
    finally:
        torch.distributed.destroy_process_group()


def run_on_ranks(target, *args, world_size: int = 2, timeout: float = 120) -> list:
    """`target(*args)` on each rank (a process group is up); returns the results in rank order."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [
        context.Process(target=_worker, args=(rank, world_size, port, target, args, results))
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    # Results are read before joining: a rank whose result is still in the queue's pipe cannot exit.
    collected = {}
    try:
        for _ in range(world_size):
            rank, result = results.get(timeout=timeout)
            collected[rank] = result
    finally:
        for worker in workers:
            worker.join(timeout=timeout if len(collected) == world_size else 5)
            if worker.is_alive():
                worker.kill()
    assert all(worker.exitcode == 0 for worker in workers), "a worker rank failed (see its stderr)"
    return [collected[rank] for rank in range(world_size)]
