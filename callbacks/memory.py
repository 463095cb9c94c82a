"""MemoryMonitor: peak memory per device (allocated and reserved on CUDA/NPU, resident set size on CPU)."""

from __future__ import annotations

import resource
import sys

import lightning as L
import torch


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak bytes so far on `device`: allocator figures on accelerators, the process's peak RSS on CPU."""
    if device.type == "cpu":
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss": rss if sys.platform == "darwin" else rss * 1024}
    backend = getattr(torch, device.type)  # torch.cuda, or torch.npu once torch_npu is imported
    return {
        "peak_allocated": backend.max_memory_allocated(device),
        "peak_reserved": backend.max_memory_reserved(device),
    }


class MemoryMonitor(L.Callback):
    """Logs `memory/peak_*_mb` every step; at the end of training keeps the largest peak over all ranks
    in `peak_memory_bytes` (reserved on accelerators, RSS on CPU) for the throughput summary row."""

    def __init__(self) -> None:
        self.peak_memory_bytes: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        figures = peak_memory(trainer.strategy.root_device)
        pl_module.log_dict({f"memory/{name}_mb": value / 2**20 for name, value in figures.items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        figures = peak_memory(device)
        local = figures.get("peak_reserved", figures.get("peak_rss"))
        # Every rank takes part in this reduction; the summary reports the busiest device.
        peak = trainer.strategy.reduce(torch.tensor(float(local), device=device), reduce_op="max")
        self.peak_memory_bytes = int(peak.item())
