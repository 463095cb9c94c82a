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


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1); x: [B, T, H, D], cos/sin: [B, T, 1, D]."""
    if resolve_backend(x, backend) == "npu":
        return torch_npu().npu_rotary_mul(x, cos, sin)
    if not torch.is_grad_enabled():  # decoding: skip the Function's per-call overhead
        return _rotate(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin half by half, without materialising rotate_half(x); `transposed` applies
    the transposed rotation (the gradient): g * cos + rotate_half^T(g * sin), rotate_half^T(u) = cat(u2, -u1).

    Every product and sum is rounded once, as in the formulas written with rotate_half (and a + (-b) is
    exactly a - b), so results are bit-identical to them.
    """
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
    x1, x2 = x.chunk(2, dim=-1)
    c1, c2 = cos.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    if transposed:
        torch.mul(x1, c1, out=o1).add_(x2 * s2)
        torch.mul(x2, c2, out=o2).sub_(x1 * s1)
    else:
        torch.mul(x1, c1, out=o1).sub_(x2 * s1)
        torch.mul(x2, c2, out=o2).add_(x1 * s2)
    return out


class _Rotary(torch.autograd.Function):
    """Saves only cos/sin (autograd's version also allocates rotate_half(x) and its negation each way)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, transposed=True), None, None
