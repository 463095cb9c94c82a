"""MMLU accuracy of a model: per subject and micro-averaged, split over data-parallel ranks.

Scoring "logits" (lm-eval's way) compares the next-token logits of the four answer letters after
"Answer:". The letter tokens are those of " A" .. " D" as they follow "Answer:" in the full text
(sentencepiece "▁A", not a bare "A"), exactly what lm-eval scores as the continuation " A".
Scoring "generate" (the recipe's way) greedily generates one token and reads the letter from it;
anything that is not a letter counts as wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mistral_lightning.distributed import gather_unique, rank_and_world_size
from mistral_lightning.errors import UserError
from mistral_lightning.evaluation.mmlu_data import (
    LETTERS,
    SCORING_MODES,
    MMLUDataError,
    Question,
    Subject,
    build_prompt,
    load_mmlu,
)
from mistral_lightning.generation import generate, next_token_logits
from mistral_lightning.prompts import encode_chat_prompt
from mistral_lightning.tokenizer import Tokenizer


@dataclass
class _Item:
    index: int  # position in the full question list, the same on every rank
    subject: str
    question: Question
    prompt_ids: list[int] | None = None
    shots: int = 0
    prediction: int = -1  # index into LETTERS, -1 when the model gave no letter


def answer_letter_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the answer letters as the token that follows "Answer:" in "Answer: A"."""
    context = tokenizer.encode("Answer:", bos=False)
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(f"Answer: {letter}", bos=False)
        if full[:-1] != context:
            raise UserError(
                f"tokenizer {tokenizer.path} does not encode 'Answer: {letter}' as 'Answer:' plus one letter "
                "token; MMLU letter scoring needs a Llama/Mistral-style sentencepiece tokenizer"
            )
        ids.append(full[-1])
    return ids


def _prompt_ids(
    tokenizer: Tokenizer, subject: Subject, item: _Item, shots: int, chat_template: bool, context: int
) -> tuple[list[int], int]:
    """The k-shot prompt's ids; like Hendrycks et al., drop shots until it fits the model's context."""
    for k in range(min(shots, len(subject.dev)), -1, -1):
        text = build_prompt(subject.name, subject.dev[:k], item.question)
        if chat_template:
            ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": text}])
        else:
            ids = tokenizer.encode(text, bos=True)
        if len(ids) < context:
            return ids, k
    raise MMLUDataError(
        f"{item.question.source}: even the 0-shot prompt has {len(ids)} tokens, more than the model's "
        f"context of {context}; skip this subject with --subjects"
    )


def _predict(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    scoring: str,
    letter_ids: list[int],
    prefill_chunk_size: int | None,
) -> list[int]:
    if scoring == "logits":
        logits = next_token_logits(model, prompts, prefill_chunk_size=prefill_chunk_size)
        return logits[:, letter_ids].argmax(dim=-1).tolist()
    first_tokens = generate(model, prompts, 1, eos_id=None, prefill_chunk_size=prefill_chunk_size)
    letters = [tokenizer.decode(tokens).strip()[:1] for tokens in first_tokens]
    return [LETTERS.index(letter) if letter in LETTERS else -1 for letter in letters]


def _summary(items: list[_Item], subjects: list[Subject]) -> tuple[float, dict[str, dict]]:
    """Micro-averaged accuracy and per-subject accuracy, with torchmetrics (items are already gathered)."""
    # Imported here: torchmetrics takes seconds to import, which evaluate --harness need not pay.
    from torchmetrics import MeanMetric

    overall = MeanMetric(sync_on_compute=False)
    per_subject = {}
    for subject in subjects:
        correct = torch.tensor(
            [float(item.prediction == item.question.answer) for item in items if item.subject == subject.name]
        )
        metric = MeanMetric(sync_on_compute=False)
        metric.update(correct)
        overall.update(correct)
        per_subject[subject.name] = {"accuracy": metric.compute().item(), "num_questions": len(correct)}
    return overall.compute().item(), per_subject


def evaluate_mmlu(
    model: nn.Module,
    tokenizer: Tokenizer,
    data_dir: str | Path,
    *,
    shots: int = 5,
    subjects: list[str] | None = None,
    chat_template: bool = False,
    batch_size: int = 8,
    scoring: str = "logits",
    prefill_chunk_size: int | None = None,
) -> dict:
    """Score `model` on MMLU's test questions; returns accuracy per subject, the micro-average and predictions.

    When torch.distributed is initialized, each rank scores every world_size-th question and the
    results are gathered, so every rank returns the full report.
    """
    if scoring not in SCORING_MODES:
        raise UserError(f"unknown MMLU scoring {scoring!r}; choose one of {SCORING_MODES}")
    if batch_size < 1 or shots < 0:
        raise UserError(f"batch size must be >= 1 and shots >= 0, got {batch_size} and {shots}")
    loaded = load_mmlu(data_dir, subjects, shots)
    letter_ids = answer_letter_ids(tokenizer)
    pairs = [(subject.name, question) for subject in loaded for question in subject.test]
    items = [_Item(index, name, question) for index, (name, question) in enumerate(pairs)]
    by_name = {subject.name: subject for subject in loaded}
    rank, world_size = rank_and_world_size()
    mine = items[rank::world_size]
    for item in mine:
        item.prompt_ids, item.shots = _prompt_ids(
            tokenizer, by_name[item.subject], item, shots, chat_template, model.config.max_seq_length
        )
    # Batches of similar length waste little compute on padding.
    mine.sort(key=lambda item: len(item.prompt_ids))
    # Rank 0 shows its own share; the others score theirs at the same pace.
    desc = "MMLU questions" if world_size == 1 else f"MMLU questions (rank 0's 1/{world_size})"
    progress = tqdm(total=len(mine), desc=desc, disable=rank != 0, leave=False)  # the table follows
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        predictions = _predict(
            model, tokenizer, [item.prompt_ids for item in batch], scoring, letter_ids, prefill_chunk_size
        )
        for item, prediction in zip(batch, predictions):
            item.prediction, item.prompt_ids = prediction, None
        progress.update(len(batch))
    progress.close()
    scored = gather_unique(mine, key=lambda item: item.index)
    accuracy, per_subject = _summary(scored, loaded)
    return {
        "task": "mmlu",
        "scoring": scoring,
        "shots": shots,
        "chat_template": chat_template,
        "accuracy": accuracy,
        "num_questions": len(scored),
        "subjects": per_subject,
        "predictions": [
            {
                "source": item.question.source,
                "subject": item.subject,
                "answer": LETTERS[item.question.answer],
                "prediction": LETTERS[item.prediction] if item.prediction >= 0 else None,
                "shots": item.shots,
            }
            for item in scored
        ],
    }


def format_table(results: dict) -> str:
    """A plain-text table: one row per subject, then the micro-average over all questions."""
    names = list(results["subjects"])
    width = max([len(name) for name in names] + [len("all (micro-average)")])
    lines = [f"{'subject':<{width}}  {'questions':>9}  {'accuracy':>8}", "-" * (width + 21)]
    for name in names:
        row = results["subjects"][name]
        lines.append(f"{name:<{width}}  {row['num_questions']:>9}  {row['accuracy']:>8.4f}")
    lines.append("-" * (width + 21))
    lines.append(
        f"{'all (micro-average)':<{width}}  {results['num_questions']:>9}  {results['accuracy']:>8.4f}"
    )
    return "\n".join(lines)
