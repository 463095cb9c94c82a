"""Lightning callbacks: throughput (tokens/s/p, samples/s, s/step, TFLOPs, MFU) and peak memory per device."""

from mistral_lightning.callbacks.memory import MemoryMonitor, peak_memory
from mistral_lightning.callbacks.throughput import (
    PEAK_TFLOPS,
    ThroughputMonitor,
    format_summary,
    lookup_peak_tflops,
    training_flops_per_token,
)

__all__ = [
    "PEAK_TFLOPS",
    "MemoryMonitor",
    "ThroughputMonitor",
    "format_summary",
    "lookup_peak_tflops",
    "peak_memory",
    "training_flops_per_token",
]
