"""Cross-entropy of an LM head's logits without whole-sequence fp32 logits.

fp32 logits for one 32K sequence are [32768, 32000] x 4 bytes = 4 GB, so the head and the loss run
`chunk_size` positions at a time. For a plain linear head (one device, or FSDP with the weight
gathered) the gradients are computed in the same pass (softmax - one-hot), which avoids both a
recomputation of the head and the log-softmax backward, and positions without a label (-100)
never reach the head. A tensor-parallel head (a DTensor weight)
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
        # Only positions with a label reach the LM head: in SFT most positions are prompt (-100), and
        # their logits would be computed and thrown away.
        kept_rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        all_kept = len(kept_rows) == len(labels)
        kept_hidden = hidden if all_kept else hidden.index_select(0, kept_rows)
        kept_labels = labels if all_kept else labels.index_select(0, kept_rows)
        # Softmax statistics in at least fp32, whatever the compute dtype.
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = hidden.new_zeros((), dtype=acc_dtype)
        kept_grad = torch.empty_like(kept_hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs_grad else None
        for start in range(0, len(kept_rows), chunk_size):
            chunk, target = kept_hidden[start : start + chunk_size], kept_labels[start : start + chunk_size]
            logits = (chunk @ weight.t()).to(acc_dtype)
            # In place on the chunk's logits: shift by the row max, exponentiate, normalise.
            logits.sub_(logits.amax(-1, keepdim=True))
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            exp = logits.exp_()
            sum_exp = exp.sum(-1)
            total += (sum_exp.log() - target_logit).sum()
            if needs_grad:
                # d(sum of losses)/d(logits) = softmax - one_hot.
                probs = exp.div_(sum_exp[:, None])
                probs[torch.arange(len(target), device=probs.device), target] -= 1.0
                grad_logits = probs.to(hidden.dtype)
                kept_grad[start : start + chunk_size] = grad_logits @ weight
                grad_weight += grad_logits.t() @ chunk
        count = kept_rows.new_tensor(max(len(kept_rows), 1))
        if needs_grad:
            grad_hidden = (
                kept_grad if all_kept else hidden.new_zeros(hidden.shape).index_copy_(0, kept_rows, kept_grad)
            )
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
