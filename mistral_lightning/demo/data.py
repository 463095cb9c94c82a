"""`mistral-lightning demo-data`: deterministic synthetic data that a tiny model can learn on a CPU in minutes.

Writes an Alpaca-schema parquet (instruction, input, output, text) with train and held-out splits of short
word tasks, and an MMLU-layout folder of multiple-choice questions about the same tasks. One training row in
five asks the model to write a multiple-choice question about a task, with its answer, in the MMLU prompt's
own format ("...\nD. <choice>\nAnswer: B"): the fine-tuning loss then covers the answer letter right after
"Answer:", the position MMLU scores. (Rows that pose the question in Alpaca's "### Response:" layout did not
carry over to the 5-shot prompt: a 9M model scored 0.22 against chance 0.25.) Held-out rows and MMLU test
questions use inputs that never occur in the training split.

For preference fine-tuning (DPO) it also writes `prompt`, `chosen`, `rejected` parquet (train and held-out) on the
same tasks: the prompt is the user turn the Alpaca rows become under `preprocess --handler messages`
("<instruction>\n<words>"), chosen the right answer and rejected a near miss that is never right (the words as
given, reversed, the first one in capitals, or a count one too high).
"""

from __future__ import annotations

import csv
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mistral_lightning.errors import UserError
from mistral_lightning.evaluation.mmlu_data import LETTERS, Question, format_question, subject_title
from mistral_lightning.outputs import NewFile

WORDS = (
    "cat",
    "dog",
    "sun",
    "red",
    "blue",
    "tree",
    "fish",
    "bird",
    "moon",
    "star",
    "car",
    "book",
    "cup",
    "hat",
)
MC_INSTRUCTION = "Write a multiple choice question about {}, with its answer."
ALPACA_HEADER = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request."
PREFERENCE_STREAM = 1  # the preference rows' random stream: np.random.default_rng([seed, PREFERENCE_STREAM])
HELD_OUT_PERCENT = 15  # share of all possible inputs reserved for the held-out split and the MMLU test set


@dataclass(frozen=True)
class Task:
    subject: str  # MMLU subject name (file stem)
    instruction: str
    answer: Callable[[list[str]], str]
    min_words: int
    max_words: int


TASKS = (
    Task("word_reversal", "Reverse the order of the words.", lambda w: " ".join(reversed(w)), 2, 4),
    Task("capitalization", "Write the words in capital letters.", lambda w: " ".join(w).upper(), 1, 3),
    Task("word_repetition", "Repeat the words twice.", lambda w: " ".join(w + w), 1, 2),
    Task("word_counting", "How many words are there?", lambda w: str(len(w)), 1, 4),
)


@dataclass(frozen=True)
class DemoDataPaths:
    train: Path  # Alpaca-schema parquet
    heldout: Path  # Alpaca-schema parquet, inputs disjoint from train
    mmlu: Path  # folder with dev/ and test/ CSVs
    preference_train: Path  # prompt/chosen/rejected parquet
    preference_heldout: Path  # prompt/chosen/rejected parquet, inputs disjoint from train


def _held_out(task: Task, words: list[str]) -> bool:
    """A stable, seed-independent split of the input space: the same input always lands on the same side."""
    return zlib.crc32(f"{task.subject}|{' '.join(words)}".encode()) % 100 < HELD_OUT_PERCENT


def _sample_words(rng: np.random.Generator, task: Task) -> list[str]:
    count = int(rng.integers(task.min_words, task.max_words + 1))
    return [WORDS[i] for i in rng.integers(0, len(WORDS), size=count)]


def _sample(rng: np.random.Generator, task: Task, held_out: bool) -> list[str]:
    while True:
        words = _sample_words(rng, task)
        if _held_out(task, words) == held_out:
            return words


def _alpaca_text(instruction: str, input_text: str, output: str) -> str:
    """The `text` column as in the tatsu-lab/alpaca parquet the recipe downloads."""
    if input_text:
        header = ALPACA_HEADER.format(", paired with an input that provides further context")
        return f"{header}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n{output}"
    return f"{ALPACA_HEADER.format('')}\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"


def _near_misses(words: list[str]) -> list[str]:
    """Answers that look right for some task on `words`: the words as given, reversed, the first one in capitals,
    and a count one too high (which no task's right answer ever equals, so one is always wrong)."""
    return [" ".join(words), " ".join(words[::-1]), words[0].upper(), str(len(words) + 1)]


def _choices(rng: np.random.Generator, task: Task, words: list[str]) -> tuple[list[str], int]:
    """The right answer and three distinct wrong ones (near misses first), in a random order."""
    correct = task.answer(words)
    wrong: list[str] = []
    for candidate in [*_near_misses(words), *(task.answer(_sample_words(rng, task)) for _ in range(100))]:
        if candidate != correct and candidate not in wrong and len(wrong) < 3:
            wrong.append(candidate)
    position = int(rng.integers(0, 4))
    return wrong[:position] + [correct] + wrong[position:], position


def _question(rng: np.random.Generator, task: Task, words: list[str]) -> Question:
    choices, answer = _choices(rng, task, words)
    return Question(f"{task.instruction} {' '.join(words)}", tuple(choices), answer, source="demo-data")


def _alpaca_rows(rng: np.random.Generator, count: int, held_out: bool) -> list[dict[str, str]]:
    """Word-task rows; in the training split one row in five writes an MMLU-format question instead."""
    rows = []
    for index in range(count):
        task = TASKS[index % len(TASKS)]
        words = _sample(rng, task, held_out)
        if not held_out and index % 5 == 4:
            instruction, input_text = MC_INSTRUCTION.format(subject_title(task.subject)), ""
            output = format_question(_question(rng, task, words), with_answer=True).strip()
        else:
            instruction, input_text, output = task.instruction, " ".join(words), task.answer(words)
        rows.append(
            {
                "instruction": instruction,
                "input": input_text,
                "output": output,
                "text": _alpaca_text(instruction, input_text, output),
            }
        )
    return rows


def _preference_rows(rng: np.random.Generator, count: int, held_out: bool) -> list[dict[str, str]]:
    """Word-task prompts with the right answer chosen and a near miss rejected."""
    rows = []
    for index in range(count):
        task = TASKS[index % len(TASKS)]
        words = _sample(rng, task, held_out)
        correct = task.answer(words)
        wrong = [candidate for candidate in dict.fromkeys(_near_misses(words)) if candidate != correct]
        rejected = wrong[int(rng.integers(0, len(wrong)))]
        # The user turn MistralHandler makes of the Alpaca row with this instruction and input.
        rows.append(
            {"prompt": f"{task.instruction}\n{' '.join(words)}", "chosen": correct, "rejected": rejected}
        )
    return rows


def _write_parquet(rows: list[dict[str, str]], path: Path) -> None:
    """The rows as a parquet table, their columns in the first row's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({column: [row[column] for row in rows] for column in rows[0]})
    with NewFile(path) as stream:
        pq.write_table(table, stream)


def _write_mmlu_csv(rng: np.random.Generator, task: Task, count: int, held_out: bool, path: Path) -> None:
    with NewFile(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        for _ in range(count):
            words = _sample(rng, task, held_out)
            question = _question(rng, task, words)
            writer.writerow([question.question, *question.choices, LETTERS[question.answer]])


def write_demo_data(
    out_dir: str | os.PathLike,
    train_rows: int = 4000,
    heldout_rows: int = 400,
    mmlu_test_per_subject: int = 50,
    seed: int = 0,
    preference_rows: int = 1000,
    preference_heldout_rows: int = 200,
) -> DemoDataPaths:
    """Write the demo data under `out_dir` (same arguments, same bytes) and return where it went."""
    if min(train_rows, heldout_rows, mmlu_test_per_subject, preference_rows, preference_heldout_rows) < 1:
        raise UserError(
            "demo-data: --train-rows, --heldout-rows, --mmlu-test-per-subject, --preference-rows and "
            "--preference-heldout-rows must be positive"
        )
    out = Path(out_dir)
    paths = DemoDataPaths(
        out / "alpaca" / "train.parquet",
        out / "alpaca" / "heldout.parquet",
        out / "mmlu",
        out / "preference" / "train.parquet",
        out / "preference" / "heldout.parquet",
    )
    for folder in (
        paths.train.parent,
        paths.preference_train.parent,
        paths.mmlu / "dev",
        paths.mmlu / "test",
    ):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _write_parquet(_alpaca_rows(rng, train_rows, held_out=False), paths.train)
    _write_parquet(_alpaca_rows(rng, heldout_rows, held_out=True), paths.heldout)
    for task in TASKS:
        # 5-shot exemplars come from the training side of the split, test questions from the held-out side.
        _write_mmlu_csv(rng, task, 5, False, paths.mmlu / "dev" / f"{task.subject}_dev.csv")
        _write_mmlu_csv(
            rng, task, mmlu_test_per_subject, True, paths.mmlu / "test" / f"{task.subject}_test.csv"
        )
    # A random stream of its own: the rows above stay as they were, and these do not depend on their counts.
    preference = np.random.default_rng([seed, PREFERENCE_STREAM])
    _write_parquet(_preference_rows(preference, preference_rows, held_out=False), paths.preference_train)
    _write_parquet(
        _preference_rows(preference, preference_heldout_rows, held_out=True), paths.preference_heldout
    )
    return paths
