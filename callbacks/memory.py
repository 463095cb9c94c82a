"""MemoryMonitor: peak memory per device (allocated and reserved on CUDA/NPU, resident set size on CPU)."""

from __future__ import annotations

import lightning as L
import torch

from mistral_lightning.devices import peak_memory


class MemoryMonitor(L.Callback):
    """Logs `memory/peak_*_mib` (MiB, 2**20 bytes) every step; at the end of training keeps the largest
    peak over all ranks in `peak_memory_bytes` (reserved on accelerators, RSS on CPU) for the summary row."""

    def __init__(self) -> None:
        self.peak_memory_bytes: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        figures = peak_memory(trainer.strategy.root_device)
        pl_module.log_dict({f"memory/{name}_mib": value / 2**20 for name, value in figures.items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        figures = peak_memory(device)
        local = figures.get("peak_reserved", figures.get("peak_rss"))
        # Every rank takes part in this reduction; the summary reports the busiest device.
        peak = trainer.strategy.reduce(torch.tensor(float(local), device=device), reduce_op="max")
        self.peak_memory_bytes = int(peak.item())
