"""Lightning callbacks: throughput (tokens/s/p, samples/s, s/step, TFLOPs, MFU) and peak memory per device.

This folder sits at the top of the repository but installs as `mistral_lightning.callbacks` (the
`package-dir` mapping in pyproject.toml), so configs name it `mistral_lightning.callbacks.RecipeThroughputMonitor`.
"""

from mistral_lightning.callbacks.memory import MemoryMonitor, peak_memory
from mistral_lightning.callbacks.throughput import (
    PEAK_TFLOPS,
    RecipeThroughputMonitor,
    format_summary,
    lookup_peak_tflops,
    training_flops_per_token,
)

__all__ = [
    "PEAK_TFLOPS",
    "MemoryMonitor",
    "RecipeThroughputMonitor",
    "format_summary",
    "lookup_peak_tflops",
    "peak_memory",
    "training_flops_per_token",
]
