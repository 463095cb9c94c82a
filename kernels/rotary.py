"""Rotary position embeddings in the rotate-half layout (the layout HF Mistral weights use)."""

from __future__ import annotations

import torch

from mistral_lightning.kernels.backend import resolve_backend, torch_npu


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, T, 1, head_dim], broadcastable over heads in [B, T, H, D] tensors."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, 1, D]."""
    if resolve_backend(x, backend) == "npu":
        return torch_npu().npu_rotary_mul(x, cos, sin)
    return x * cos + _rotate_half(x) * sin
