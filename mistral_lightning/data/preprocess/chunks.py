"""What flows through preprocessing: chunks of rows read from one file, and their encoded documents.

Every chunk carries its origin (file and first row number) to the worker and back, so any skipped
row is reported by file and row whatever order the chunks are encoded in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHUNK_ROWS = 1000


class RowSkip(Exception):
    """A row that is counted and left out: `kind` groups it in the summary, `detail` locates the problem."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


# A row the reader could parse, or why it could not (the handler counts it as skipped).
Row = dict | RowSkip


@dataclass(frozen=True)
class ChunkOrigin:
    path: Path
    first_row: int  # 1-based number, within `path`, of the chunk's first row

    def row(self, index: int) -> str:
        """Where the chunk's `index`-th row is, as the summary names it."""
        return f"{self.path} row {self.first_row + index}"


@dataclass
class RowChunk:
    origin: ChunkOrigin
    rows: list[Row]


@dataclass
class EncodedChunk:
    """One chunk's documents per output key (flat tokens + lengths), and what was dropped or cut."""

    origin: ChunkOrigin
    flat: dict[str, np.ndarray] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    token_count: int = 0  # tokens of text (not of masks or labels) in the documents
    skipped: list[tuple[int, RowSkip]] = field(default_factory=list)  # (row within chunk, why)
    truncated: int = 0

    @property
    def documents(self) -> int:
        return len(next(iter(self.lengths.values())))
