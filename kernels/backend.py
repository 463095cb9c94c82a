"""Pick a kernel implementation by the tensor's device and what is installed.

Override with the `backend=` argument of each kernel or the environment variable
MISTRAL_LIGHTNING_KERNELS (auto | portable | flash | flex | npu), so tests can force every path.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from mistral_lightning.errors import UserError

BACKEND_ENV = "MISTRAL_LIGHTNING_KERNELS"
BACKENDS = ("auto", "portable", "flash", "flex", "npu")
# flash-attn 2 runs fp16 and bf16 on Ampere (compute capability 8.0) and newer GPUs.
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)

log = logging.getLogger(__name__)


def resolve_backend(tensor: torch.Tensor, requested: str | None = None) -> str:
    """The backend for `tensor`'s device and dtype; "auto" takes flash-attn on CUDA where it can run
    (`flash_attention_unusable`) and FlexAttention on CUDA where it cannot, the portable path elsewhere. A
    requested backend is used as given."""
    choice = requested or os.environ.get(BACKEND_ENV) or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"unknown kernel backend {choice!r} (from {BACKEND_ENV} or backend=); choose one of {BACKENDS}"
        )
    if choice != "auto":
        return choice
    if tensor.device.type == "npu":
        return "npu"
    if tensor.device.type == "cuda":
        return "flash" if _flash_attention_usable(tensor.device, tensor.dtype) else "flex"
    return "portable"


def flash_attention_unusable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash-attn cannot run attention over `dtype` tensors on the CUDA `device`, or None if it can:
    not installed, a dtype it has no kernel for, a GPU older than Ampere, or a compiled extension that does
    not load (built against another torch, say; it would otherwise fail at the first attention call)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (`make` installs it on a GPU machine)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FLASH_MIN_CAPABILITY:
        return f"flash-attn needs compute capability 8.0 (Ampere) or newer; {device} has {major}.{minor}"
    if dtype not in FLASH_DTYPES:
        return f"flash-attn has no {dtype} kernel (fp16 and bf16 only)"
    try:
        importlib.import_module("flash_attn").flash_attn_func  # noqa: B018  (loads the compiled extension)
    except (ImportError, OSError, AttributeError) as err:
        return f"flash-attn does not load ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


# Checked once per (device, dtype): the answer does not change within a process.
_FLASH_USABLE: dict[tuple[torch.device, torch.dtype], bool] = {}


def _flash_attention_usable(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device, dtype)
    if key not in _FLASH_USABLE:
        reason = flash_attention_unusable(device, dtype)
        if reason is not None:
            log.warning("%s; attention on %s in %s runs FlexAttention (compiled)", reason, device, dtype)
        _FLASH_USABLE[key] = reason is None
    return _FLASH_USABLE[key]


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
