"""Prompts for LightningCLI `predict`: a JSONL file, one `{"prompt": ...}` or `{"messages": [...]}` per line.

Batches are `{"index", "prompt", "input_ids"}` with `input_ids` as token-id lists of different
lengths, which `MistralLightningModule.predict_step` hands to `generate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from mistral_lightning.errors import UserError
from mistral_lightning.generation.loading import load_tokenizer
from mistral_lightning.outputs import user_path
from mistral_lightning.prompts import encode_chat_prompt
from mistral_lightning.tokenizer import Tokenizer


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Each non-blank line as a dict with "prompt" (text) or "messages" (a chat ending on a user turn)."""
    path = Path(user_path(path))
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist; give a JSONL file with one prompt per line")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not (
            isinstance(record.get("prompt"), str) or isinstance(record.get("messages"), list)
        ):
            raise UserError(f'{path}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
        records.append(record)
    if not records:
        raise UserError(f"prompts file {path} has no prompts")
    return records


class PromptsDataset(Dataset):
    """Tokenized prompts; plain prompts get BOS, or the tokenizer's chat format when `chat` is set."""

    def __init__(self, records: list[dict[str, Any]], tokenizer: Tokenizer, chat: bool = False) -> None:
        self.items = []
        for index, record in enumerate(records):
            if "messages" in record:
                messages = record["messages"]
            elif chat:
                messages = [{"role": "user", "content": record["prompt"]}]
            else:
                messages = None
            ids = encode_chat_prompt(tokenizer, messages) if messages else tokenizer.encode(record["prompt"])
            self.items.append({"index": index, "prompt": record.get("prompt", messages), "input_ids": ids})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [item[key] for item in items] for key in ("index", "prompt", "input_ids")}


class PromptsDataModule(L.LightningDataModule):
    """`predict` data: prompts_file (JSONL), chat, batch_size, and tokenizer_model, which defaults to the
    model's own tokenizer (that of `ckpt_path`, else of `model.pretrained`; Mistral v1 when neither names one).
    """

    def __init__(
        self,
        prompts_file: str,
        tokenizer_model: str | None = None,
        chat: bool = False,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.prompts_file = prompts_file
        self.tokenizer_model = None if tokenizer_model is None else user_path(tokenizer_model)
        self.chat = chat
        self.batch_size = batch_size
        self.records: list[dict[str, Any]] | None = None
        self.tokenizer: Tokenizer | None = None
        self.dataset: PromptsDataset | None = None

    def setup(self, stage: str) -> None:
        if self.records is None:
            self.records = read_prompts(self.prompts_file)

    def predict_dataloader(self) -> DataLoader:
        # Built here, not in setup: the trainer knows its ckpt_path only once it restores the checkpoint.
        if self.dataset is None:
            self.setup("predict")
            self.tokenizer = self._model_tokenizer()
            self.dataset = PromptsDataset(self.records, self.tokenizer, self.chat)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_prompts)

    def _model_tokenizer(self) -> Tokenizer:
        """data.tokenizer_model, else that of the weights predict runs: ckpt_path, else model.pretrained."""
        if self.trainer is None:
            return load_tokenizer(self.tokenizer_model, None)
        module = self.trainer.lightning_module
        checkpoint = self.trainer.ckpt_path or module.hparams.get("pretrained")
        config = getattr(module, "config", None)  # MistralLightningModule's MistralConfig
        return load_tokenizer(
            self.tokenizer_model, checkpoint, vocab_size=getattr(config, "vocab_size", None)
        )
