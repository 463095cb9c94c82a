from __future__ import annotations

import torch

from mistral_lightning.kernels.backend import resolve_backend, torch_npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as HF Mistral does."""
    if resolve_backend(x, backend) == "npu":
        return torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
