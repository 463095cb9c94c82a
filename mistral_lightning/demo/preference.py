"""The demo's DPO leg, scored: how a model ranks the two answers of held-out preference pairs.

For each pair it sums the model's log-probabilities of the chosen and of the rejected answer (the tokens
`preprocess --handler preference` labels), as DPO itself does, and reports the share of pairs whose chosen
answer is the more likely one and the mean log-probability of each side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mistral_lightning.data.datasets import PACKED_SUFFIX, PreferenceDataset, pad_collate
from mistral_lightning.data.indexed import IndexedDataset
from mistral_lightning.data.preprocess.preference import PREFERENCE_KEYS
from mistral_lightning.model import Mistral
from mistral_lightning.training.preference import pair_sums


@dataclass(frozen=True)
class PairRanking:
    """Over held-out pairs: the share ranked chosen-first, and the mean log-probability of each side."""

    chosen_first: float
    chosen_log_prob: float
    rejected_log_prob: float


@torch.no_grad()
def rank_pairs(model: Mistral, prefix: Path, seq_length: int, batch_size: int = 32) -> PairRanking:
    """How `model` ranks the pairs of the preference datasets at `prefix`, one pair per row."""
    indexed = [IndexedDataset(f"{prefix}{PACKED_SUFFIX.format(key)}") for key in PREFERENCE_KEYS]
    dataset = PreferenceDataset(
        tuple(indexed[:2]), tuple(indexed[2:]), range(len(indexed[0])), seq_length, seed=0
    )
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        batch = pad_collate(rows, seq_length)
        tokens = model.token_log_probs(
            batch["input_ids"], batch["labels"], batch["position_ids"], document_ids=batch["document_ids"]
        )
        sums = pair_sums(tokens, batch["document_ids"])
        chosen.append(sums.chosen[sums.present])
        rejected.append(sums.rejected[sums.present])
    chosen_sums, rejected_sums = torch.cat(chosen), torch.cat(rejected)
    return PairRanking(
        float((chosen_sums > rejected_sums).float().mean()),
        float(chosen_sums.mean()),
        float(rejected_sums.mean()),
    )
