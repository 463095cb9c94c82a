"""MMLU data: header-less CSVs `<subject>_{dev,test}.csv` (question, A, B, C, D, answer) and prompts.

Prompts follow Hendrycks et al.'s evaluation (the format lm-eval and the recipe use): a header
naming the subject, k solved dev examples, then the question ending in "Answer:".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from mistral_lightning.errors import UserError

LETTERS = ("A", "B", "C", "D")
SCORING_MODES = ("logits", "generate")  # compare the letters' next-token logits, or generate one token


class MMLUDataError(UserError):
    """The MMLU folder or one of its CSV files is missing or malformed."""


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into LETTERS
    source: str  # "file:line", for error messages and the JSON report


@dataclass
class Subject:
    name: str
    test: list[Question]
    dev: list[Question]


def read_questions(path: Path) -> list[Question]:
    """Every row of one CSV; a malformed row raises MMLUDataError naming the file and line."""
    questions = []
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        line = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return questions
            except csv.Error as error:
                raise MMLUDataError(f"{path}:{line}: unreadable CSV ({error}); fix the quoting") from error
            start, line = line, reader.line_num + 1
            if not row:
                continue
            if len(row) != 6:
                raise MMLUDataError(
                    f"{path}:{start}: expected 6 columns (question, A, B, C, D, answer), found {len(row)}; "
                    "quote fields that contain commas"
                )
            answer = row[5].strip().upper()
            if answer not in LETTERS:
                raise MMLUDataError(f"{path}:{start}: answer {row[5]!r} is not one of A, B, C, D")
            choices = (row[1], row[2], row[3], row[4])
            questions.append(Question(row[0], choices, LETTERS.index(answer), f"{path}:{start}"))


def _split_dirs(data_dir: Path) -> tuple[Path, Path]:
    """(test, dev) folders: DIR/test and DIR/dev, or DIR itself when it is the test folder (as in the recipe)."""
    if (data_dir / "test").is_dir():
        return data_dir / "test", data_dir / "dev"
    if any(data_dir.glob("*_test.csv")):
        return data_dir, data_dir.parent / "dev"
    raise MMLUDataError(
        f"{data_dir}: no test/ folder and no *_test.csv files; pass the MMLU data folder holding dev/ and test/"
    )


def load_mmlu(data_dir: str | Path, subjects: list[str] | None = None, shots: int = 5) -> list[Subject]:
    """Subjects in name order, with their test questions and (when shots > 0) their dev examples."""
    test_dir, dev_dir = _split_dirs(Path(data_dir))
    available = sorted(path.name.removesuffix("_test.csv") for path in test_dir.glob("*_test.csv"))
    if not available:
        raise MMLUDataError(f"{test_dir}: no <subject>_test.csv files found")
    unknown = sorted(set(subjects or []) - set(available))
    if unknown:
        raise MMLUDataError(f"unknown subject(s) {unknown} in --subjects; {test_dir} has {available}")
    loaded = []
    for name in sorted(set(subjects)) if subjects else available:
        dev: list[Question] = []
        if shots > 0:
            dev_file = dev_dir / f"{name}_dev.csv"
            if not dev_file.is_file():
                raise MMLUDataError(f"{dev_file}: missing; {shots}-shot prompts need it (or pass --shots 0)")
            dev = read_questions(dev_file)
        test_file = test_dir / f"{name}_test.csv"
        test = read_questions(test_file)
        if not test:
            raise MMLUDataError(f"{test_file}: has no questions; remove it or fill it in")
        loaded.append(Subject(name, test, dev))
    return loaded


def format_question(question: Question, with_answer: bool) -> str:
    text = question.question + "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices)
    )
    return text + (f"\nAnswer: {LETTERS[question.answer]}\n\n" if with_answer else "\nAnswer:")


def subject_title(subject: str) -> str:
    """A subject's file stem as the prompt names it: "high_school_physics" -> "high school physics"."""
    return subject.replace("_", " ")


def build_prompt(subject: str, shots: list[Question], question: Question) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject_title(subject)}.\n\n"
    return (
        header
        + "".join(format_question(shot, with_answer=True) for shot in shots)
        + format_question(question, with_answer=False)
    )
