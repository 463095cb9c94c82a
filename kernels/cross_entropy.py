from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor):
    logits = head(hidden).float()
    return F.cross_entropy(
        logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean token cross-entropy of head(hidden) against labels, ignoring -100.

    The LM head runs on `chunk_size` positions at a time and each chunk is recomputed in the
    backward pass, so fp32 logits for the whole sequence ([T, 32000] x 4 bytes = 4 GB at 32K)
    never exist at once.
    """
    seq_len = hidden.shape[1]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, seq_len, chunk_size):
        chunk_hidden, chunk_labels = (
            hidden[:, start : start + chunk_size],
            labels[:, start : start + chunk_size],
        )
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, head, chunk_hidden, chunk_labels, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, chunk_hidden, chunk_labels)
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
