"""Linear layers whose weights are packed once into oneDNN's blocked layout, for inference on the CPU.

A plain bf16 `F.linear` on the CPU re-lays out the weight for oneDNN on every call; for one decoded
token (a matrix-vector product) that copy costs more than the product itself. Packing once, as
torch.compile's CPU freezing pass does, makes batch-1 products faster, in bf16 most, with bit-identical
bf16 results (benchmarks/results/kernel_choices.md). Packed weights are inference-only: they have no
gradient and are left out of the state dict.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mistral_lightning.kernels.backend import cpu_has_bf16_matmul


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this weight here: a local CPU tensor in fp32, or bf16 where the CPU supports it."""
    if isinstance(weight, DTensor) or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return cpu_has_bf16_matmul()
    return weight.dtype == torch.float32


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward with the weight packed for a batch of one row (it runs any batch)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def pack_linear_weights(model: nn.Module) -> int:
    """Replace, in place, every `nn.Linear` of `model` whose weight `can_pack` with a PackedLinear.

    For inference only (the model can no longer be trained or saved); returns how many were packed.
    """
    packed = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear and can_pack(child.weight):
                setattr(module, name, PackedLinear(child))
                packed += 1
    return packed
