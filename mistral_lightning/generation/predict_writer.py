"""Writes `predict` outputs as JSONL: one `{"index", "prompt", "completion"}` per prompt, in file order.

Rows are collected per batch and written once at the end of the epoch by global rank 0, after
gathering them from all ranks (data-parallel ranks hold different prompts; tensor-parallel peers
and a DistributedSampler's padding repeat some, which the prompt index merges).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from mistral_lightning.distributed import gather_unique
from mistral_lightning.errors import UserError


class JsonlPredictionWriter(BasePredictionWriter):
    """Use with `PromptsDataModule` (its tokenizer decodes); `stop` strings cut each completion."""

    def __init__(self, output_file: str, stop: list[str] | None = None) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.output_file = Path(output_file)
        self.stop = stop or []
        self._rows: list[dict[str, Any]] = []

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
            self.output_file.parent.mkdir(parents=True, exist_ok=True)
            with self.output_file.open("w", encoding="utf-8") as file:
                for row in unique:
                    file.write(json.dumps(row, ensure_ascii=False) + "\n")
