"""Ascend NPU support for Lightning: an `npu` accelerator and a model-parallel strategy over hccl.

Importing this package registers the accelerator, so `trainer.accelerator: npu` works in YAML.
Everything that touches the device goes through `torch_npu`, imported lazily by the one importer,
kernels.backend.torch_npu (it exists only on Ascend machines).
"""

from lightning.pytorch.accelerators import AcceleratorRegistry

from mistral_lightning.npu.accelerator import NPUAccelerator
from mistral_lightning.npu.strategy import NPUModelParallelStrategy

if NPUAccelerator.name() not in AcceleratorRegistry:
    NPUAccelerator.register_accelerators(AcceleratorRegistry)

__all__ = ["NPUAccelerator", "NPUModelParallelStrategy"]
