from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_lightning.kernels.backend import resolve_backend, torch_npu


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up; on Ascend one fused operator over the concatenated halves."""
    if resolve_backend(gate, backend) == "npu":
        return torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)
    if not torch.is_grad_enabled():  # decoding: skip the Function's per-call overhead
        return _silu_product(gate, up)
    return _SwiGLU.apply(gate, up)


def _silu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """Autograd's own gradients (silu_backward), but silu(gate) is recomputed in the backward pass instead of
    kept: one [tokens, FFN] activation less per layer (benchmarks/results/kernel_choices.md)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _silu_product(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up
