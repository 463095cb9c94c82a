"""Cross-entropy of an LM head's logits without whole-sequence fp32 logits.

fp32 logits for one 32K sequence are [32768, 32000] x 4 bytes = 4 GB, so the head and the loss run
`chunk_size` positions at a time. For a plain linear head (one device, or FSDP with the weight
gathered) the gradients are computed in the same pass (softmax - one-hot), which avoids both a
recomputation of the head and the log-softmax backward, and positions without a label (-100)
never reach the head. A tensor-parallel head (a DTensor weight)
takes the generic path: each chunk through the module, recomputed in the backward pass.

Per chunk, the loss and softmax - one-hot come either from in-place eager ops (the fewest passes eager
can do: about 8 over a [chunk, vocab] fp32 block) or, with `compiled=True`, from a formulation that
torch.compile fuses into two passes. Compiled, the fusable form is the fastest; in eager it is the slowest,
hence both (figures: benchmarks/results/kernel_choices.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from mistral_lightning.labels import IGNORE_INDEX

Reduction = Literal["mean", "sum"]


def _loss_and_logit_grad_in_place(logits, target, acc_dtype, grad_dtype):
    """(sum of -log softmax(logits)[target], softmax - one-hot in grad_dtype or None), reusing one buffer."""
    logits = logits.to(acc_dtype)
    logits.sub_(logits.amax(-1, keepdim=True))
    target_logit = logits.gather(1, target[:, None]).squeeze(1)
    exp = logits.exp_()
    sum_exp = exp.sum(-1)
    loss = (sum_exp.log() - target_logit).sum()
    if grad_dtype is None:
        return loss, None
    probs = exp.div_(sum_exp[:, None])
    probs[torch.arange(len(target), device=probs.device), target] -= 1.0
    return loss, probs.to(grad_dtype)


def _loss_and_logit_grad_fusable(logits, target, acc_dtype, grad_dtype):
    """The same values written for inductor: no in-place ops, the one-hot as a comparison it can fuse."""
    x = logits.to(acc_dtype)
    row_max = x.amax(-1, keepdim=True)
    exp = (x - row_max).exp()
    sum_exp = exp.sum(-1, keepdim=True)
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]
    target_logit = torch.where(one_hot, x, 0.0).sum(-1)
    loss = (sum_exp.squeeze(1).log() + row_max.squeeze(1) - target_logit).sum()
    return loss, (exp / sum_exp - one_hot.to(acc_dtype)).to(grad_dtype)


_compiled_loss_and_logit_grad = None


def _compiled(logits, target, acc_dtype, grad_dtype):
    global _compiled_loss_and_logit_grad
    if _compiled_loss_and_logit_grad is None:  # compiled on first use, so importing never needs a compiler
        _compiled_loss_and_logit_grad = torch.compile(_loss_and_logit_grad_fusable)
    return _compiled_loss_and_logit_grad(logits, target, acc_dtype, grad_dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, compiled, mean):
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
        grad_weight = None
        for start in range(0, len(kept_rows), chunk_size):
            chunk, target = kept_hidden[start : start + chunk_size], kept_labels[start : start + chunk_size]
            logits = chunk @ weight.t()
            # d(sum of losses)/d(logits) = softmax - one_hot.
            if compiled and needs_grad:
                loss, grad_logits = _compiled(logits, target, acc_dtype, hidden.dtype)
            else:
                grad_dtype = hidden.dtype if needs_grad else None
                loss, grad_logits = _loss_and_logit_grad_in_place(logits, target, acc_dtype, grad_dtype)
            total += loss
            if needs_grad:
                kept_grad[start : start + chunk_size] = grad_logits @ weight
                # Accumulated in the weight's dtype: a bf16 addmm_ adds each chunk's product in fp32 and rounds
                # the running sum once per chunk (an fp32 buffer instead rounded each chunk's bf16 product: as
                # many roundings), without the buffer's fill, casts and extra passes, which cost time
                # (benchmarks/results/kernel_choices.md).
                if grad_weight is None:
                    grad_weight = grad_logits.t() @ chunk
                else:
                    grad_weight.addmm_(grad_logits.t(), chunk)
        # The sum is divided by 1, so one backward serves both reductions.
        count = kept_rows.new_tensor(max(len(kept_rows), 1) if mean else 1)
        if needs_grad:
            if grad_weight is None:  # no position has a label
                grad_weight = torch.zeros_like(weight)
            grad_hidden = (
                kept_grad if all_kept else hidden.new_zeros(hidden.shape).index_copy_(0, kept_rows, kept_grad)
            )
            ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        grad_hidden = grad_hidden * scale.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight * scale.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def _chunk_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor):
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _chunk_log_probs(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor
):
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = -F.cross_entropy(logits, labels, reduction="none")
    # Under loss_parallel the per-position values are a DTensor over the tensor-parallel ranks.
    return log_probs.full_tensor() if isinstance(log_probs, DTensor) else log_probs


def chunked_token_log_probs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log softmax(head(hidden))[label] at every labelled position, 0 where the label is -100: [B, T] in at
    least fp32, differentiable. Only labelled positions reach the head, `chunk_size` at a time, each chunk's
    logits recomputed in the backward pass instead of kept (a preference loss weighs every sequence by its own
    factor, so the gradient cannot be formed in the forward pass as the fused loss does)."""
    flat_hidden, flat_labels = hidden.flatten(0, -2), labels.flatten()
    kept_rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    kept_hidden, kept_labels = flat_hidden.index_select(0, kept_rows), flat_labels.index_select(0, kept_rows)
    pieces = []
    for start in range(0, len(kept_rows), chunk_size):
        chunk, target = kept_hidden[start : start + chunk_size], kept_labels[start : start + chunk_size]
        if torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(_chunk_log_probs, head, chunk, target, use_reentrant=False))
        else:
            pieces.append(_chunk_log_probs(head, chunk, target))
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    values = torch.cat(pieces) if pieces else flat_hidden.new_zeros(0, dtype=acc_dtype)
    # Written into a [B, T] tensor of its own, not returned as a view: FSDP2 warns of a forward method's views.
    width = labels.shape[-1]
    out = flat_hidden.new_zeros(labels.shape, dtype=values.dtype)
    return out.index_put_((kept_rows // width, kept_rows % width), values)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 1024,
    compiled: bool = False,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Token cross-entropy of head(hidden) [B, T, V] against labels [B, T], ignoring -100: the mean over the
    labelled tokens (0 without any), or their sum (for a mean over several micro-batches or ranks).

    compiled: fuse each chunk's softmax and gradient with torch.compile (needs a C++ compiler on the CPU).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    weight = getattr(head, "weight", None)
    # type(), not isinstance: a subclass (a LoRA head) computes more than weight @ hidden.
    if type(head) is nn.Linear and head.bias is None and not isinstance(weight, DTensor):
        return _FusedLinearCrossEntropy.apply(
            hidden.flatten(0, -2), weight, labels.flatten(), chunk_size, compiled, reduction == "mean"
        )
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
    if reduction == "sum":
        return total
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
