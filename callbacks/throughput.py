"""RecipeThroughputMonitor: s/step, samples/s, tokens/s/p, TFLOPs per device and MFU, as the recipe reports them.

Definitions (docs/ARCHITECTURE.md, "Throughput and memory"): tokens/s/p = tokens of the global batch / step
time / number of devices, all devices included (TP ranks too); samples/s = global batch / step time. Padding
is not a token: positions with `document_ids == -1` (the padding of instruction batches) are left out, so
packed pretraining batches count global batch * sequence length, as the recipe does. The ranks of one
tensor-parallel group see the same batch, so a batch is counted once per data-parallel replica.
Model FLOPs per token ~ 6 * (non-embedding parameters, LM head included) + 12 * layers * attention
width * attended keys, with attended keys = min(seq, window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from time import perf_counter

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.utilities import rank_zero_info

from mistral_lightning.callbacks.memory import MemoryMonitor
from mistral_lightning.config import MistralConfig
from mistral_lightning.devices import device_name, synchronize
from mistral_lightning.distributed import context_parallel_layout, data_parallel_layout

# Dense bf16 peak TFLOPs per device, matched as a substring of the device name (first match wins, so a
# variant comes before its family). Ascend 910_93 (A3) has no row: no official dense bf16 figure was found;
# give RecipeThroughputMonitor's peak_tflops there.
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
# The loggers' run summary: the end-of-fit row under these names (W&B and MLflow show a metric's last value).
SUMMARY_PREFIX = "summary/"


def lookup_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def attended_keys(config: MistralConfig, seq_length: int) -> int:
    return seq_length if config.sliding_window is None else min(seq_length, config.sliding_window)


def training_flops(config: MistralConfig, tokens: int, token_keys: int) -> float:
    """Forward + backward FLOPs of `tokens` trained tokens that attend `token_keys` keys in all (the
    embedding lookup is not a matmul)."""
    non_embedding = config.num_params - config.vocab_size * config.hidden_size
    return (
        6 * non_embedding * tokens + 12 * config.num_layers * config.num_heads * config.head_dim * token_keys
    )


def training_flops_per_token(config: MistralConfig, seq_length: int) -> float:
    return training_flops(config, 1, attended_keys(config, seq_length))


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
    """The batch's tokens without padding (`document_ids == -1`); a device tensor, read once per step."""
    document_ids = batch.get("document_ids")
    if document_ids is None:
        return batch["input_ids"].numel()
    return (document_ids >= 0).sum()


@dataclass
class _Totals:
    """Running totals over all data-parallel replicas, at the end of an optimizer step."""

    time: float = 0.0
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    token_keys: int = 0  # sum over tokens of the keys each attends (for the FLOPs)


class RecipeThroughputMonitor(L.Callback):
    """Logs throughput every optimizer step from the second on (rolling over up to `window_size` steps),
    prints the recipe's summary row at the end of `fit` and sends it to the loggers as `summary/*` metrics.

    Args:
        window_size: optimizer steps in the rolling average (Lightning's `Throughput`); until that many
            steps have run, the average is over the steps so far.
        peak_tflops: the device's dense peak for MFU; default from PEAK_TFLOPS by device name. CPUs have
            no entry: set it to get MFU on a CPU.
    """

    def __init__(self, window_size: int = 20, peak_tflops: float | None = None) -> None:
        if window_size < 2:
            raise ValueError(f"RecipeThroughputMonitor.window_size must be at least 2, got {window_size}")
        self.window_size = window_size
        self.peak_tflops = peak_tflops
        self.summary: dict[str, float | int | str] | None = None

    # ------------------------------------------------------------------ layout
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.world_size = trainer.world_size
        self.replicas = data_parallel_layout(trainer.strategy)[0]
        # Under context parallelism each rank's batch is one shard of the replica's sequences.
        self.context = context_parallel_layout(trainer.strategy)[0]
        self.device = trainer.strategy.root_device
        self.device_name = device_name(self.device)
        peak = self.peak_tflops if self.peak_tflops is not None else lookup_peak_tflops(self.device_name)
        # The totals are those of all devices, so Throughput's one "device" has the peak of all of them.
        self.total_peak_flops = peak * 1e12 * self.world_size if peak else None
        self._totals = _Totals()
        self._pending: list[
            tuple[torch.Tensor | int, int]
        ] = []  # this step's micro-batches: tokens, keys each
        self._window: deque[_Totals] = deque(maxlen=self.window_size)
        self._first: _Totals | None = None
        self._last_step = trainer.global_step
        self._start = perf_counter()

    # ------------------------------------------------------------------ counting
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        batch_size, seq_len = batch["input_ids"].shape
        self._totals.samples += batch_size * self.replicas
        keys = attended_keys(pl_module.config, seq_len * self.context)
        self._pending.append((count_tokens(batch), keys))
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients for this optimizer step
        synchronize(self.device)
        totals = self._totals
        totals.time = perf_counter() - self._start
        totals.steps += 1
        tokens, token_keys = self._step_tokens(trainer)
        totals.tokens += tokens
        totals.token_keys += token_keys
        self._window.append(replace(totals))
        self._last_step = trainer.global_step
        if self._first is None:
            # The first step carries one-off costs (allocation, compilation); the summary starts after it.
            self._first = self._window[-1]
        metrics = self._recipe_metrics(self._rates(list(self._window), pl_module.config))
        if metrics:
            pl_module.log_dict({f"throughput/{name}": value for name, value in metrics.items()})

    def _step_tokens(self, trainer: L.Trainer) -> tuple[int, int]:
        """This step's tokens and token-keys over all replicas (tensor-parallel ranks of a replica count the same
        tokens; context-parallel ranks count one shard each)."""
        tokens = sum(int(count) for count, _ in self._pending)
        token_keys = sum(int(count) * keys for count, keys in self._pending)
        self._pending.clear()
        if self.replicas == 1 and self.context == 1:
            return tokens, token_keys
        # Padding differs between replicas; every rank takes part, each replica counted world/replicas times.
        local = torch.tensor([tokens, token_keys], dtype=torch.int64, device=self.device)
        summed = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        counted_twice = self.world_size // (self.replicas * self.context)
        return summed[0] // counted_twice, summed[1] // counted_twice

    def _rates(self, points: list[_Totals], config: MistralConfig) -> dict[str, float]:
        """Throughput's rates between the first and the last of `points` (empty with fewer than two)."""
        if len(points) < 2:
            return {}
        throughput = Throughput(available_flops=self.total_peak_flops, window_size=len(points))
        for previous, point in zip([None, *points], points):
            flops = training_flops(config, point.tokens, point.token_keys)
            if previous is not None:
                flops -= training_flops(config, previous.tokens, previous.token_keys)
            throughput.update(
                time=point.time, batches=point.steps, samples=point.samples, lengths=point.tokens, flops=flops
            )
        return throughput.compute()

    def _recipe_metrics(self, raw: dict[str, float]) -> dict[str, float]:
        """Throughput's whole-cluster rates in the recipe's units; empty until there are two steps."""
        if "device/batches_per_sec" not in raw:
            return {}
        metrics = {
            "s_per_step": 1.0 / raw["device/batches_per_sec"],
            "samples_per_sec": raw["device/samples_per_sec"],
            "tokens_per_sec_per_device": raw["device/items_per_sec"] / self.world_size,
            "tflops_per_device": raw["device/flops_per_sec"] / self.world_size / 1e12,
        }
        if "device/mfu" in raw:
            metrics["mfu"] = raw["device/mfu"]
        return metrics

    # ------------------------------------------------------------------ summary
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # From the end of the first step to the end of the last one.
        points = [self._first, self._window[-1]] if self._first is not None else []
        if points and points[1].steps == points[0].steps:
            points = []  # a single step has no rate
        self.summary = {
            "device": f"{self.world_size} x {self.device_name}",
            "model": pl_module.model_name,
            "iterations": trainer.global_step,
            **self._recipe_metrics(self._rates(points, pl_module.config)),
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After MemoryMonitor.on_train_end has gathered the peak over all ranks; no collectives here.
        if self.summary is None or not trainer.is_global_zero:
            return
        memory = next(
            (cb.peak_memory_bytes for cb in trainer.callbacks if isinstance(cb, MemoryMonitor)), None
        )
        # Before Lightning finalizes the loggers, which follows on_fit_end.
        metrics = summary_metrics(self.summary, memory)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(format_summary(self.summary, memory))


def summary_metrics(summary: dict[str, float | int | str], memory_bytes: int | None) -> dict[str, float]:
    """The summary row's numbers as logger metrics: `summary/tokens_per_sec_per_device`, ..., `summary/peak_memory_mib`."""
    metrics = {
        f"{SUMMARY_PREFIX}{name}": float(value)
        for name, value in summary.items()
        if isinstance(value, int | float)
    }
    if memory_bytes is not None:
        metrics[f"{SUMMARY_PREFIX}peak_memory_mib"] = memory_bytes / 2**20
    return metrics


def format_summary(summary: dict[str, float | int | str], memory_bytes: int | None) -> str:
    """The recipe's throughput table: a header and one row (memory in MiB, 2**20 bytes)."""

    def number(key: str, spec: str) -> str:
        return format(summary[key], spec) if key in summary else "n/a"

    row = [
        str(summary["device"]),
        str(summary["model"]),
        str(summary["iterations"]),
        number("samples_per_sec", ".3g"),
        number("tokens_per_sec_per_device", ".0f"),
        number("s_per_step", ".3g"),
        f"~{memory_bytes / 2**20:.0f}MiB" if memory_bytes is not None else "n/a",
    ]
    header = ["Device", "Model", "Iterations", "samples/s", "tokens/s/p", "s/step", "memory/p"]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in (header, ["---"] * len(header), row))
