"""Pick a kernel implementation by the tensor's device and what is installed.

Override with the `backend=` argument of each kernel or the environment variable
MISTRAL_LIGHTNING_KERNELS (auto | portable | flash | npu), so tests can force every path.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from mistral_lightning.errors import UserError

BACKEND_ENV = "MISTRAL_LIGHTNING_KERNELS"
BACKENDS = ("auto", "portable", "flash", "npu")


def resolve_backend(tensor: torch.Tensor, requested: str | None = None) -> str:
    choice = requested or os.environ.get(BACKEND_ENV) or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"unknown kernel backend {choice!r} (from {BACKEND_ENV} or backend=); choose one of {BACKENDS}"
        )
    if choice != "auto":
        return choice
    if tensor.device.type == "npu":
        return "npu"
    if tensor.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return "portable"


def torch_npu(
    needed_by: str = f"the 'npu' kernel backend (set {BACKEND_ENV}=portable to run without it)",
) -> ModuleType:
    """Import torch_npu lazily: it only exists on Ascend machines (and as a fake in tests). The one importer,
    for the kernels and the NPU accelerator alike; `needed_by` says in the error what asked for it."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as err:
        raise UserError(
            f"{needed_by} needs torch_npu; install mistral-lightning[npu] on an Ascend machine "
            "(with the CANN toolkit's set_env.sh sourced)"
        ) from err


# Read once at import: torch.compile cannot trace the query itself, but can treat its answer as a constant.
_CPU_BF16_MATMUL = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_bf16_matmul() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX) rather than emulating them."""
    return _CPU_BF16_MATMUL
