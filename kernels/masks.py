"""The masks both CPU attention paths build: which keys a query sees, and the additive form kernels take."""

from __future__ import annotations

import torch


def band_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [..., Tq, Tk]: True where query position i may attend key position j (j <= i, i - j < window);
    leading dimensions of the two position tensors broadcast."""
    diff = query_positions[..., :, None] - key_positions[..., None, :]
    visible = diff >= 0
    if window is not None:
        visible &= diff < window
    return visible


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as an additive one (0 where visible, -inf elsewhere), built once and shared by every call."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
