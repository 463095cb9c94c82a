"""Cross-entropy of an LM head's logits without whole-sequence fp32 logits.

fp32 logits for one 32K sequence are [32768, 32000] x 4 bytes = 4 GB, so the head and the loss run
`chunk_size` positions at a time. For a plain linear head (one device, or FSDP with the weight
gathered) the gradients are computed in the same pass (softmax - one-hot), which avoids both a
recomputation of the head and the log-softmax backward. A tensor-parallel head (a DTensor weight)
takes the generic path: each chunk through the module, recomputed in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # Softmax statistics in at least fp32, whatever the compute dtype.
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        total = hidden.new_zeros((), dtype=acc_dtype)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            chunk, target = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            logits = (chunk @ weight.t()).to(acc_dtype)
            keep = target != IGNORE_INDEX
            safe_target = target.clamp(min=0)
            # In place on the chunk's logits: shift by the row max, exponentiate, normalise.
            logits.sub_(logits.amax(-1, keepdim=True))
            target_logit = logits.gather(1, safe_target[:, None]).squeeze(1)
            exp = logits.exp_()
            sum_exp = exp.sum(-1)
            total += ((sum_exp.log() - target_logit) * keep).sum()
            if needs_grad:
                # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored positions.
                probs = exp.div_(sum_exp[:, None])
                probs[torch.arange(len(target), device=probs.device), safe_target] -= 1.0
                grad_logits = probs.mul_(keep[:, None]).to(hidden.dtype)
                grad_hidden[start : start + chunk_size] = grad_logits @ weight
                grad_weight += grad_logits.t() @ chunk
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, count)
            ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        grad_hidden = grad_hidden * scale.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def _chunk_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor):
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean token cross-entropy of head(hidden) [B, T, V] against labels [B, T], ignoring -100."""
    weight = getattr(head, "weight", None)
    if isinstance(head, nn.Linear) and head.bias is None and not isinstance(weight, DTensor):
        return _FusedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), chunk_size)
    seq_len = hidden.shape[1]
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, seq_len, chunk_size):
        chunk_hidden, chunk_labels = (
            hidden[:, start : start + chunk_size],
            labels[:, start : start + chunk_size],
        )
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, head, chunk_hidden, chunk_labels, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, chunk_hidden, chunk_labels)
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
