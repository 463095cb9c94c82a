"""ThroughputMonitor: s/step, samples/s, tokens/s/p, TFLOPs per device and MFU, as the recipe reports them.

Definitions (docs/ARCHITECTURE.md, "Throughput and memory"): tokens/s/p = global batch * sequence length / step time / number of
devices, all devices included (TP ranks too); samples/s = global batch / step time. The ranks of one
tensor-parallel group see the same batch, so a batch is counted once per data-parallel replica.
Model FLOPs per token ~ 6 * (non-embedding parameters, LM head included) + 12 * layers * attention
width * attended keys, with attended keys = min(seq, window).
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import lightning as L
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.utilities import rank_zero_info

from mistral_lightning.callbacks.memory import MemoryMonitor
from mistral_lightning.config import MistralConfig
from mistral_lightning.devices import device_name, synchronize
from mistral_lightning.distributed import data_parallel_layout

# Dense bf16 peak TFLOPs per device, matched as a substring of the device name (first match wins, so a
# variant comes before its family). Ascend 910_93 (A3) has no row: no official dense bf16 figure was found;
# give ThroughputMonitor's peak_tflops there.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("910B1", 374.0),
    ("910B2", 354.0),
    ("910B3", 295.0),
    ("910B4", 246.0),
    ("H200 NVL", 835.0),
    ("H200", 989.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.5),
    ("A100", 312.0),
)


def lookup_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def training_flops_per_token(config: MistralConfig, seq_length: int) -> float:
    """Forward + backward FLOPs per trained token (the embedding lookup is not a matmul)."""
    non_embedding = config.num_params - config.vocab_size * config.hidden_size
    attended = seq_length if config.sliding_window is None else min(seq_length, config.sliding_window)
    return 6 * non_embedding + 12 * config.num_layers * config.num_heads * config.head_dim * attended


@dataclass
class _Totals:
    """Running totals for one data-parallel replica, at the end of an optimizer step."""

    time: float = 0.0
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0


class ThroughputMonitor(L.Callback):
    """Logs throughput every optimizer step (rolling over `window_size` steps) and prints the recipe's
    summary row at the end of `fit`.

    Args:
        window_size: optimizer steps in the rolling average (Lightning's `Throughput`).
        peak_tflops: the device's dense peak for MFU; default from PEAK_TFLOPS by device name. CPUs have
            no entry: set it to get MFU on a CPU.
    """

    def __init__(self, window_size: int = 20, peak_tflops: float | None = None) -> None:
        if window_size < 2:
            raise ValueError(f"ThroughputMonitor.window_size must be at least 2, got {window_size}")
        self.window_size = window_size
        self.peak_tflops = peak_tflops
        self.summary: dict[str, float | int | str] | None = None

    # ------------------------------------------------------------------ layout
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.world_size = trainer.world_size
        self.replicas = data_parallel_layout(trainer.strategy)[0]
        self.devices_per_replica = self.world_size // self.replicas
        self.device = trainer.strategy.root_device
        self.device_name = device_name(self.device)
        peak = self.peak_tflops if self.peak_tflops is not None else lookup_peak_tflops(self.device_name)
        # Throughput's "device" is one data-parallel replica here, so its peak is that of all its devices.
        self.replica_peak_flops = peak * 1e12 * self.devices_per_replica if peak else None
        self._rolling = self._throughput(self.window_size)
        self._totals = _Totals()
        self._previous: _Totals | None = None
        self._first: _Totals | None = None
        self._last_step = trainer.global_step
        self._start = perf_counter()

    def _throughput(self, window_size: int) -> Throughput:
        return Throughput(
            available_flops=self.replica_peak_flops, world_size=self.replicas, window_size=window_size
        )

    # ------------------------------------------------------------------ counting
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        batch_size, seq_len = batch["input_ids"].shape
        totals = self._totals
        totals.samples += batch_size
        totals.tokens += batch_size * seq_len
        totals.flops += training_flops_per_token(pl_module.config, seq_len) * batch_size * seq_len
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients for this optimizer step
        synchronize(self.device)
        totals.time = perf_counter() - self._start
        totals.steps += 1
        self._rolling.update(**self._since(self._previous, totals))
        self._previous = _Totals(**vars(totals))
        self._last_step = trainer.global_step
        if self._first is None:
            # The first step carries one-off costs (allocation, compilation); the summary starts after it.
            self._first = self._previous
        metrics = self._recipe_metrics(self._rolling.compute())
        if metrics:
            pl_module.log_dict({f"throughput/{name}": value for name, value in metrics.items()})

    @staticmethod
    def _since(previous: _Totals | None, totals: _Totals) -> dict[str, float | int]:
        """Throughput.update's arguments: running totals, and the FLOPs since the previous update."""
        return {
            "time": totals.time,
            "batches": totals.steps,
            "samples": totals.samples,
            "lengths": totals.tokens,
            "flops": totals.flops - (previous.flops if previous else 0.0),
        }

    def _recipe_metrics(self, raw: dict[str, float]) -> dict[str, float]:
        """Throughput's per-replica rates in the recipe's units; empty until its window has two points."""
        if "device/batches_per_sec" not in raw:
            return {}
        metrics = {
            "s_per_step": 1.0 / raw["device/batches_per_sec"],
            "samples_per_sec": raw["device/samples_per_sec"] * self.replicas,
            "tokens_per_sec_per_device": raw["device/items_per_sec"] * self.replicas / self.world_size,
            "tflops_per_device": raw["device/flops_per_sec"] / self.devices_per_replica / 1e12,
        }
        if "device/mfu" in raw:
            metrics["mfu"] = raw["device/mfu"]
        return metrics

    # ------------------------------------------------------------------ summary
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics: dict[str, float] = {}
        if self._first is not None and self._previous.steps > self._first.steps:
            whole_run = self._throughput(window_size=2)
            whole_run.update(**self._since(None, self._first))
            whole_run.update(**self._since(self._first, self._previous))
            metrics = self._recipe_metrics(whole_run.compute())
        self.summary = {
            "device": f"{self.world_size} x {self.device_name}",
            "model": pl_module.model_name,
            "iterations": trainer.global_step,
            **metrics,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After MemoryMonitor.on_train_end has gathered the peak over all ranks; no collectives here.
        if self.summary is None or not trainer.is_global_zero:
            return
        memory = next(
            (cb.peak_memory_bytes for cb in trainer.callbacks if isinstance(cb, MemoryMonitor)), None
        )
        rank_zero_info(format_summary(self.summary, memory))


def format_summary(summary: dict[str, float | int | str], memory_bytes: int | None) -> str:
    """The recipe's throughput table: a header and one row."""

    def number(key: str, spec: str) -> str:
        return format(summary[key], spec) if key in summary else "n/a"

    row = [
        str(summary["device"]),
        str(summary["model"]),
        str(summary["iterations"]),
        number("samples_per_sec", ".3g"),
        number("tokens_per_sec_per_device", ".0f"),
        number("s_per_step", ".3g"),
        f"~{memory_bytes / 2**20:.0f}MB" if memory_bytes is not None else "n/a",
    ]
    header = ["Device", "Model", "Iterations", "samples/s", "tokens/s/p", "s/step", "memory/p"]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in (header, ["---"] * len(header), row))
