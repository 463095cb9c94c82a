from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from mistral_lightning.kernels.backend import resolve_backend, torch_npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as HF Mistral does."""
    if resolve_backend(x, backend) == "npu":
        return torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    if isinstance(x, DTensor) or isinstance(weight, DTensor) or not torch.is_grad_enabled():
        # Sequence-parallel norms see DTensors: plain ops let DTensor derive the gradients' placements.
        # Without autograd (decoding) the Function's per-call overhead buys nothing.
        return _rms_norm_forward(x, weight, eps)[0]
    return _RMSNorm.apply(x, weight, eps)


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    """The same forward ops; the backward keeps only x (in its own dtype) and 1/rms instead of autograd's
    fp32 copy of x and intermediate products: a third of the saved memory, and fewer passes over it."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = (x32 * rstd).to(x.dtype)
            grad_weight = (grad * normed).sum_to_size(weight.shape).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x)), in fp32 like the forward.
            grad_normed = (grad * weight).float()
            dot = (grad_normed * x32).mean(-1, keepdim=True)
            grad_x = ((grad_normed - x32 * (rstd * rstd * dot)) * rstd).to(x.dtype)
        return grad_x, grad_weight, None
