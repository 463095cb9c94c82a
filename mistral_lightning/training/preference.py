"""The training objective (`model.objective`): next-token SFT, or DPO over preference pairs.

DPO (Rafailov et al., 2023) compares, for each pair, the policy's and the frozen reference's log-probability of
the chosen and of the rejected answer: with Δ = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)),
"sigmoid" is -(1 - ε) log σ(βΔ) - ε log σ(-βΔ) (ε: label smoothing, the conservative DPO of Mitchell, 2023),
and "ipo" (Azar et al., 2023) is (Δ' - 1 / (2β))² with each log-ratio divided by its answer's token count, as TRL
computes it. The pairs come in the rows the preference DataModule builds (data/contract.PreferencePairData).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from mistral_lightning.errors import UserError

ObjectiveKind = Literal["sft", "dpo"]
PreferenceLoss = Literal["sigmoid", "ipo"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """`model.objective`: kind "sft" (next-token cross-entropy) or "dpo"; DPO's beta, label_smoothing (sigmoid
    only) and loss ("sigmoid" or "ipo"). The reference is the starting model: under LoRA the same weights with
    the adapters switched off, otherwise a frozen copy sharded like the policy."""

    kind: ObjectiveKind = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss: PreferenceLoss = "sigmoid"

    def __post_init__(self) -> None:
        if self.kind not in ("sft", "dpo"):
            raise UserError(f"model.objective.kind={self.kind!r} is not one of 'sft', 'dpo'")
        if self.loss not in ("sigmoid", "ipo"):
            raise UserError(f"model.objective.loss={self.loss!r} is not one of 'sigmoid', 'ipo'")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise UserError(f"model.objective.beta={self.beta} must be a positive number (DPO's usual: 0.1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(
                f"model.objective.label_smoothing={self.label_smoothing} must be in [0, 0.5): the share of pairs "
                "assumed to be labelled the wrong way round"
            )
        if self.label_smoothing and self.loss != "sigmoid":
            raise UserError(
                "model.objective.label_smoothing applies to loss: sigmoid only; set it to 0 for ipo"
            )

    @property
    def is_preference(self) -> bool:
        return self.kind == "dpo"


class PairSums(NamedTuple):
    """Per slot [B, K] of a batch (row b's k-th pair; K = T // 2, the most a row of T positions can hold): the
    chosen and the rejected side's sums, and whether the row holds that pair. Fixed shapes, whatever the pairs:
    no step depends on values for its sizes (the memory plan runs on fake tensors; compile needs no new graph)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    present: torch.Tensor


def pair_sums(values: torch.Tensor, document_ids: torch.Tensor) -> PairSums:
    """Sum `values` [B, T] over each side of each pair (documents 2k and 2k + 1 of a row; padding -1 left out).

    Differentiable in `values`. A row's pair count is (its largest document id + 1) / 2."""
    rows, width = document_ids.shape
    slots = width // 2
    documents = document_ids.clamp(min=0)
    index = (torch.arange(rows, device=documents.device)[:, None] * width + documents).flatten()
    kept = (document_ids >= 0).flatten().to(values.dtype)
    sums = values.new_zeros(rows * width).index_add(0, index, values.flatten() * kept).view(rows, width)
    pairs_per_row = (document_ids.amax(dim=1) + 1) // 2
    present = torch.arange(slots, device=documents.device)[None, :] < pairs_per_row[:, None]
    return PairSums(sums[:, 0 : 2 * slots : 2], sums[:, 1 : 2 * slots : 2], present)


class PreferenceTerms(NamedTuple):
    """Per slot (PairSums): the loss, and the implicit rewards β (log π - log π_ref) of the chosen and rejected
    answers; 0 where the row holds no pair (`present` False)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    present: torch.Tensor


def preference_losses(
    config: ObjectiveConfig,
    policy: PairSums,
    reference: PairSums,
    answer_tokens: PairSums,
) -> PreferenceTerms:
    """DPO's per-pair losses from the policy's and the reference's answer log-probabilities (and, for IPO, the
    answers' token counts)."""
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    if config.loss == "ipo":
        delta = chosen_ratio / answer_tokens.chosen.clamp(
            min=1
        ) - rejected_ratio / answer_tokens.rejected.clamp(min=1)
        losses = (delta - 1 / (2 * config.beta)) ** 2
    else:
        logits = config.beta * (chosen_ratio - rejected_ratio)
        smoothing = config.label_smoothing
        losses = -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)
    present = policy.present
    zero = losses.new_zeros(())
    return PreferenceTerms(
        torch.where(present, losses, zero),
        torch.where(present, config.beta * chosen_ratio.detach(), zero),
        torch.where(present, config.beta * rejected_ratio.detach(), zero),
        present,
    )


# What a step logs about its pairs, summed over the pairs of the global batch and divided by their count.
PAIR_STATISTICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def pair_statistic_sums(terms: PreferenceTerms, policy: PairSums) -> torch.Tensor:
    """The sums over a micro-batch's pairs of each of PAIR_STATISTICS (TRL's names), as one tensor."""
    chosen, rejected, present = terms.chosen_rewards, terms.rejected_rewards, terms.present
    return torch.stack(
        [
            chosen.sum(),
            rejected.sum(),
            (chosen - rejected).sum(),
            ((chosen > rejected) & present).to(chosen.dtype).sum(),
            torch.where(present, policy.chosen.detach(), 0).sum(),
            torch.where(present, policy.rejected.detach(), 0).sum(),
        ]
    )
