"""The process an evaluation runs in: alone, or one of a torchrun group of model replicas."""

from __future__ import annotations

import os

import torch

from mistral_lightning.devices import accelerator_module
from mistral_lightning.kernels.backend import torch_npu


def init_distributed(device: str) -> str:
    """The device this process evaluates on. Under torchrun: the one of the requested type numbered
    LOCAL_RANK, in a process group on the backend PyTorch registers for that type (nccl for cuda, hccl for
    npu, gloo for cpu)."""
    if device.split(":")[0] == "npu":
        torch_npu(needed_by="--device npu")  # registers the npu device type, torch.npu and hccl
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    device_type = torch.device(device).type
    if device_type != "cpu":
        device = f"{device_type}:{os.environ.get('LOCAL_RANK', '0')}"
        accelerator_module(torch.device(device)).set_device(device)
    torch.distributed.init_process_group(torch.distributed.get_default_backend_for_device(device_type))
    return device


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
