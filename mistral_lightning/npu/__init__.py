"""Ascend NPU support for Lightning: an `npu` accelerator, and the model-parallel strategy whose collective
backend and autocast device follow the device (hccl and npu on Ascend, nccl and cuda on NVIDIA GPUs).

Importing this package registers the accelerator, so `trainer.accelerator: npu` works in YAML.
Everything that touches the device goes through `torch_npu`, imported lazily by the one importer,
kernels.backend.torch_npu (it exists only on Ascend machines).
"""

from lightning.pytorch.accelerators import AcceleratorRegistry

from mistral_lightning.npu.accelerator import NPUAccelerator
from mistral_lightning.npu.strategy import DeviceModelParallelStrategy, NPUModelParallelStrategy

if NPUAccelerator.name() not in AcceleratorRegistry:
    NPUAccelerator.register_accelerators(AcceleratorRegistry)

__all__ = ["DeviceModelParallelStrategy", "NPUAccelerator", "NPUModelParallelStrategy"]
