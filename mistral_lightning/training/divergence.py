"""A training run whose loss, weights or optimizer state became NaN/Inf stops with one error that names
the last good checkpoint, raised where the divergence is found (the step's reduced loss in the module,
the state about to be saved in the strategy)."""

from __future__ import annotations

from pathlib import Path

from mistral_lightning.checkpoint.integrity import last_good_checkpoint
from mistral_lightning.errors import UserError


class TrainingDivergedError(UserError):
    """The loss, weights or optimizer state became NaN/Inf; names the last good checkpoint."""


def last_good(folder: str | Path | None) -> str:
    """'the last good checkpoint is ...' for a run saving into `folder` (None: it saves none)."""
    return last_good_checkpoint(folder) if folder else "no checkpoints are being saved"
