from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_lightning.kernels.backend import resolve_backend, torch_npu


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up; on Ascend one fused operator over the concatenated halves."""
    if resolve_backend(gate, backend) == "npu":
        return torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)
    return F.silu(gate) * up
