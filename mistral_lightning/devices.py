"""One API over cpu, cuda and npu devices, for the callbacks, evaluation and benchmarks.

`torch.cuda` and `torch.npu` (registered by torch_npu) expose the same memory and synchronisation
calls, so each helper picks the module by the device's type instead of branching per backend.
"""

from __future__ import annotations

import os
import resource
import sys
from types import ModuleType

import torch

from mistral_lightning.errors import UserError


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


def total_memory(device: torch.device, processes_on_machine: int = 1) -> int:
    """Bytes of memory one process may plan for: the accelerator's, or on CPU the machine's RAM shared between
    the processes on it."""
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(processes_on_machine, 1)
    return accelerator_module(device).get_device_properties(device).total_memory


class DeviceUnavailableError(UserError):
    """A device option names a device this machine or this build of torch does not have."""


def check_device_available(device: str, option: str) -> torch.device:
    """`device` parsed, or one line naming `option`: not a device name, npu without torch_npu, or a device
    type or index this machine lacks (e.g. cuda on a CPU-only torch)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        hint = " (npu needs torch_npu: pip install 'mistral-lightning[npu]' on an Ascend machine)"
        raise DeviceUnavailableError(
            f"{option} {device!r} is not a device name this torch knows{hint if device.startswith('npu') else ''}; "
            "use cpu, cuda, cuda:N or npu:N"
        ) from err
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)
    count = backend.device_count() if backend is not None and backend.is_available() else 0
    if parsed.type == "cuda" and not torch.backends.cuda.is_built():
        reason = f"this torch {torch.__version__} is built without CUDA"
    elif count == 0:
        reason = f"no {parsed.type} device is visible"
    elif parsed.index is not None and parsed.index >= count:
        reason = f"this machine has {count} {parsed.type} device(s), numbered from 0"
    else:
        return parsed
    raise DeviceUnavailableError(
        f"{option} {device}: {reason}; use {option} cpu or a device this machine has"
    )
