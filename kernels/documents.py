"""Packed documents as the varlen kernels (flash-attn, Ascend) take them: cumulative sequence lengths."""

from __future__ import annotations

import torch


def cumulative_lengths(document_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries of a [B, T] id tensor, flattened batch-major: cumulative ends, starting at 0."""
    batch, seq_len = document_ids.shape
    changes = torch.ones_like(document_ids, dtype=torch.bool)
    changes[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.nonzero(changes.reshape(-1)).squeeze(-1)
    ends = torch.cat((starts[1:], starts.new_tensor([batch * seq_len])))
    return torch.cat((starts.new_zeros(1), ends)).to(torch.int32)
