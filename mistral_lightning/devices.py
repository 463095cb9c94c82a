"""One API over cpu, cuda and npu devices, for the callbacks, evaluation and benchmarks.

`torch.cuda` and `torch.npu` (registered by torch_npu) expose the same memory and synchronisation
calls, so each helper picks the module by the device's type instead of branching per backend.
"""

from __future__ import annotations

import resource
import sys
from types import ModuleType

import torch


def accelerator_module(device: torch.device) -> ModuleType:
    """torch.cuda or torch.npu for an accelerator device."""
    return getattr(torch, device.type)


def device_name(device: torch.device) -> str:
    return "CPU" if device.type == "cpu" else accelerator_module(device).get_device_name(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a clock read after it measures them."""
    if device.type != "cpu":
        accelerator_module(device).synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type != "cpu":
        accelerator_module(device).reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak bytes so far on `device`: allocator figures on accelerators, the process's peak RSS on CPU."""
    if device.type == "cpu":
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss": rss if sys.platform == "darwin" else rss * 1024}
    backend = accelerator_module(device)
    return {
        "peak_allocated": backend.max_memory_allocated(device),
        "peak_reserved": backend.max_memory_reserved(device),
    }
