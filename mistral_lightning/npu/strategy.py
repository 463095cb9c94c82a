"""NPUModelParallelStrategy: Lightning's ModelParallelStrategy (FSDP2 + DTensor TP) on Ascend.

The differences from CUDA are the collective backend (hccl), the device type of the mesh (npu, taken
from the root device) and the autocast device of the mixed-precision plugin, which Lightning's
accelerator connector would otherwise set to "cuda" for any accelerator other than cpu/mps.
"""

from __future__ import annotations

from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy


class NPUModelParallelStrategy(ModelParallelStrategy):
    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or "hccl"

    @property
    def precision_plugin(self) -> Precision:
        return super().precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if isinstance(plugin, MixedPrecision) and plugin.device != "npu":
            plugin = MixedPrecision(plugin.precision, device="npu")
        self._precision_plugin = plugin
