"""NPUAccelerator: Lightning's view of Ascend devices, through torch_npu.

Importing this module registers the accelerator, so `trainer.accelerator: npu` works in YAML. Everything
that touches the device goes through `torch_npu`, imported lazily by the one importer,
kernels.backend.torch_npu (it exists only on Ascend machines).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry

from mistral_lightning.errors import UserError
from mistral_lightning.kernels.backend import torch_npu


def _npu():
    """`torch.npu`, which torch_npu installs when imported."""
    torch_npu(needed_by="trainer.accelerator npu")
    return torch.npu


def check_npu_accelerator(accelerator: Any) -> None:
    """When `trainer.accelerator` names the NPU, import torch_npu now: without it, one line saying so, instead
    of Lightning's "NPUAccelerator can not run on your system" traceback."""
    name = str(getattr(accelerator, "class_path", accelerator))
    if name == NPUAccelerator.name() or name.rsplit(".", 1)[-1] == NPUAccelerator.__name__:
        _npu()


class NPUAccelerator(Accelerator):
    """Ascend NPUs: `trainer.devices` is a count, a list of indices, "0,1" or "auto"/-1 for all."""

    def setup_device(self, device: torch.device) -> None:
        if device.type != "npu":
            raise UserError(f"NPUAccelerator was given device {device}; expected an npu device")
        _npu().set_device(device)

    def teardown(self) -> None:
        _npu().empty_cache()

    def get_device_stats(self, device: torch.device | str | int) -> dict[str, Any]:
        return _npu().memory_stats(device)

    @staticmethod
    def parse_devices(devices: int | str | list[int]) -> list[int]:
        available = NPUAccelerator.auto_device_count()
        if isinstance(devices, str):
            devices = devices.strip()
            if devices in ("auto", "-1"):
                devices = -1
            elif "," in devices:
                devices = [int(part) for part in devices.split(",") if part.strip()]
            else:
                devices = int(devices)
        if devices == -1:
            devices = available
        indices = list(range(devices)) if isinstance(devices, int) else list(devices)
        if not indices or any(index < 0 or index >= available for index in indices):
            raise UserError(
                f"trainer.devices={devices!r} asks for NPUs {indices}, but this machine has {available}; "
                "give a count or indices below that (ASCEND_RT_VISIBLE_DEVICES limits what is visible)"
            )
        return indices

    @staticmethod
    def get_parallel_devices(devices: list[int]) -> list[torch.device]:
        return [torch.device("npu", index) for index in devices]

    @staticmethod
    def auto_device_count() -> int:
        return _npu().device_count()

    @staticmethod
    def is_available() -> bool:
        try:
            return bool(_npu().is_available())
        except UserError:  # torch_npu is not installed
            return False

    @staticmethod
    def name() -> str:
        return "npu"

    @classmethod
    def register_accelerators(cls, accelerator_registry) -> None:
        accelerator_registry.register(cls.name(), cls, description="Ascend NPU through torch_npu")


if NPUAccelerator.name() not in AcceleratorRegistry:
    NPUAccelerator.register_accelerators(AcceleratorRegistry)
