"""DeviceModelParallelStrategy: Lightning's ModelParallelStrategy (FSDP2 + DTensor TP) on any accelerator.

Two choices follow the device instead of being fixed: the collective backend, the one PyTorch registers for the
device type (nccl for cuda, hccl for npu once torch_npu is imported, gloo for cpu), and the autocast device of
the mixed-precision plugin, which Lightning's accelerator connector sets to "cuda" for every accelerator other
than cpu/mps. The device mesh takes its type from the root device already.
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from mistral_lightning.strategy import SafeModelParallelStrategy


class DeviceModelParallelStrategy(SafeModelParallelStrategy):
    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or torch.distributed.get_default_backend_for_device(
            self.root_device
        )

    @property
    def precision_plugin(self) -> Precision:
        return super().precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # The connector sets the accelerator before the precision plugin; its registered name is the device type.
        name = getattr(self.accelerator, "name", None)
        device_type = name() if callable(name) else None
        if isinstance(plugin, MixedPrecision) and device_type not in (None, plugin.device):
            plugin = MixedPrecision(plugin.precision, device=device_type)
        self._precision_plugin = plugin


# The name configs written for Ascend use.
NPUModelParallelStrategy = DeviceModelParallelStrategy
