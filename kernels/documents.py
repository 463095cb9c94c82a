"""What every layer's attention shares within one forward pass: the packed documents, and what the device kernels
derive from them once per batch instead of once per layer."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def document_lengths(document_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents of a [B, T] id tensor, flattened batch-major (every row starts a new document),
    read to the host in one device-to-host copy."""
    batch, seq_len = document_ids.shape
    starts_here = torch.ones_like(document_ids, dtype=torch.bool)
    starts_here[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.nonzero(starts_here.reshape(-1).cpu()).squeeze(-1)
    ends = torch.cat((starts[1:], starts.new_tensor([batch * seq_len])))
    return (ends - starts).tolist()


class AttentionMetadata:
    """Built once per batch by the model and passed to every layer: `document_ids` [B, T] (None: every row is one
    sequence), and a cache of what kernels derive from them (host lengths, cumulative lengths on the device,
    Ascend's compressed mask), so that each is computed once per batch, also when checkpointed layers recompute.
    The model passes it through; only kernels/ reads it."""

    def __init__(self, document_ids: torch.Tensor | None = None) -> None:
        self.document_ids = document_ids
        self._derived: dict[Hashable, Any] = {}

    def derived(self, key: Hashable, build: Callable[[], T]) -> T:
        """`build()` on the first request for `key` in this batch, the same object afterwards."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def document_lengths(self) -> list[int]:
        """The documents' lengths on the host (see `document_lengths`); needs `document_ids`."""
        if self.document_ids is None:
            raise ValueError("document lengths need document_ids")
        return self.derived("document_lengths", lambda: document_lengths(self.document_ids))
