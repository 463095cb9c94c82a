"""Writes `predict` outputs as JSONL: one `{"index", "prompt", "completion"}` per prompt, in file order.

Rows are collected per batch and written once at the end of the epoch by global rank 0, after
gathering them from all ranks (data-parallel ranks hold different prompts; tensor-parallel peers
and a DistributedSampler's padding repeat some, which the prompt index merges). The file is checked
before predicting starts and written through a temporary sibling (outputs.py): an existing file is
replaced only with `overwrite`, and only when it holds earlier predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from mistral_lightning.distributed import gather_unique
from mistral_lightning.errors import UserError
from mistral_lightning.outputs import FileKind, OutputTarget, check_output_file, write_output_file

# Earlier predictions start with the first row as written below; `overwrite` replaces only such a file.
PREDICTIONS_JSONL = FileKind(
    "predictions JSONL written by predict", lambda head: head.startswith(b'{"index": ')
)


class JsonlPredictionWriter(BasePredictionWriter):
    """Use with `PromptsDataModule` (its tokenizer decodes); `stop` strings cut each completion."""

    def __init__(self, output_file: str, stop: list[str] | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.output_file = Path(output_file)
        self.target = OutputTarget(
            self.output_file, option="output_file", overwrite=overwrite, overwrite_option="overwrite: true"
        )
        self.stop = stop or []
        self._rows: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # Refuse an output that cannot be written before generating, not after.
        if trainer.is_global_zero:
            check_output_file(self.target, PREDICTIONS_JSONL)

    def _cut(self, text: str) -> str:
        for stop in self.stop:
            text = text.split(stop, 1)[0] if stop else text
        return text

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise UserError(
                "JsonlPredictionWriter needs a datamodule with a `tokenizer` (e.g. PromptsDataModule)"
            )
        for index, prompt, completion_ids in zip(batch["index"], batch["prompt"], prediction):
            completion = self._cut(tokenizer.decode(completion_ids))
            self._rows.append({"index": index, "prompt": prompt, "completion": completion})

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module, predictions, batch_indices) -> None:
        unique = gather_unique(self._rows, key=lambda row: row["index"])
        self._rows = []
        if trainer.is_global_zero:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in unique)
            write_output_file(self.target, PREDICTIONS_JSONL, lines)
