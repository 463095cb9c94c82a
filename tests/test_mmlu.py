"""MMLU: the prompt format, the letter tokens lm-eval scores, accuracy bookkeeping with a model whose
answers are known in advance, data-parallel splitting over gloo, and parity with transformers."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch
import transformers
from helpers.mmlu import write_mmlu
from helpers.processes import run_on_ranks
from torch import nn

from mistral_lightning import Mistral, MistralConfig, cli
from mistral_lightning.cli import evaluate as evaluate_cli
from mistral_lightning.evaluation.mmlu import answer_letter_ids, evaluate_mmlu
from mistral_lightning.evaluation.mmlu_data import MMLUDataError, build_prompt, load_mmlu
from mistral_lightning.tokenizer import Tokenizer

COLOURS = {"red": "A", "blue": "B", "green": "C", "yellow": "D"}


class ColourReader(nn.Module):
    """A model whose answers are known in advance: the letter of the last colour word in its input.

    With `distractor`, an unrelated token gets an even higher logit, which letter scoring must ignore.
    """

    def __init__(self, tokenizer_path: str, distractor: bool = False, max_seq_length: int = 4096) -> None:
        super().__init__()
        sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
        self.config = MistralConfig(
            vocab_size=sp.vocab_size(), hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
            num_kv_heads=1, head_dim=8, sliding_window=None, max_seq_length=max_seq_length,
        )  # fmt: skip
        self.anchor = nn.Parameter(torch.zeros(()))
        self.colour_letter = {
            sp.piece_to_id(f"▁{c}"): sp.piece_to_id(f"▁{letter}") for c, letter in COLOURS.items()
        }
        self.distractor = sp.piece_to_id("▁the") if distractor else None

    def forward(self, input_ids, position_ids=None, *, kv_cache=None, logits_to_keep=None):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        for row, ids in enumerate(input_ids.tolist()):
            colours = [self.colour_letter[i] for i in ids if i in self.colour_letter]
            if colours:
                logits[row, :, colours[-1]] = 5.0
            if self.distractor is not None:
                logits[row, :, self.distractor] = 10.0
        return logits if logits_to_keep is None else logits[:, -logits_to_keep:]


def _questions(data, shots):
    return [(subject, question) for subject in load_mmlu(data, shots=shots) for question in subject.test]


def test_prompt_follows_the_hendrycks_format(tmp_path):
    subject = load_mmlu(write_mmlu(tmp_path), ["high_school_physics"], shots=2)[0]
    assert build_prompt(subject.name, subject.dev, subject.test[1]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Is ice cold?\nA. Yes\nB. No\nC. Never\nD. Maybe\nAnswer: A\n\n"
        "Is a green apple ripe?\nA. Yes\nB. No\nC. Maybe\nD. Often\nAnswer: C\n\n"
        "Is a blue flame hot?\nA. No\nB. Maybe\nC. Never\nD. Yes\nAnswer:"
    )


def test_letter_tokens_are_the_continuation_lm_eval_scores(tokenizer, tokenizer_path, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    letter_ids = answer_letter_ids(tokenizer)
    assert letter_ids == [sp.piece_to_id(f"▁{letter}") for letter in "ABCD"]
    subject = load_mmlu(write_mmlu(tmp_path), ["astronomy"], shots=1)[0]
    context = build_prompt(subject.name, subject.dev, subject.test[0])
    # lm-eval: continuation tokens = encode(context + " A") minus encode(context).
    for letter, letter_id in zip("ABCD", letter_ids):
        whole, prefix = sp.encode(context + f" {letter}"), sp.encode(context)
        assert whole[: len(prefix)] == prefix and whole[len(prefix) :] == [letter_id]


@pytest.mark.parametrize(("scoring", "batch_size"), [("logits", 1), ("logits", 4), ("generate", 4)])
def test_accuracy_of_a_model_with_known_answers(tokenizer, tokenizer_path, tmp_path, scoring, batch_size):
    model = ColourReader(tokenizer_path, distractor=scoring == "logits")
    results = evaluate_mmlu(
        model, tokenizer, write_mmlu(tmp_path), shots=2, batch_size=batch_size, scoring=scoring
    )
    assert results["subjects"] == {
        "astronomy": {"accuracy": 0.75, "num_questions": 4},
        "high_school_physics": {"accuracy": 0.5, "num_questions": 2},
    }
    assert results["accuracy"] == pytest.approx(4 / 6) and results["num_questions"] == 6
    assert [p["prediction"] for p in results["predictions"]] == ["A", "B", "C", "D", "A", "B"]
    assert results["predictions"][1]["source"].endswith("astronomy_test.csv:2")


def test_generate_scoring_counts_a_non_letter_answer_as_wrong(tokenizer, tokenizer_path, tmp_path):
    model = ColourReader(tokenizer_path, distractor=True)
    results = evaluate_mmlu(model, tokenizer, write_mmlu(tmp_path), scoring="generate", chat_template=True)
    assert results["accuracy"] == 0.0
    assert {p["prediction"] for p in results["predictions"]} == {None}


def test_shots_are_dropped_until_the_prompt_fits(tokenizer, tokenizer_path, tmp_path):
    data = write_mmlu(tmp_path)
    model = ColourReader(tokenizer_path, max_seq_length=100)
    results = evaluate_mmlu(model, tokenizer, data, shots=2)
    for prediction, (subject, question) in zip(results["predictions"], _questions(data, shots=2)):
        full = tokenizer.encode(build_prompt(subject.name, subject.dev, question))
        shorter = tokenizer.encode(build_prompt(subject.name, subject.dev[:1], question))
        assert prediction["shots"] == (2 if len(full) < 100 else 1 if len(shorter) < 100 else 0)
    assert {p["shots"] for p in results["predictions"]} == {1, 2}
    assert results["accuracy"] == pytest.approx(4 / 6)
    with pytest.raises(MMLUDataError, match=r"astronomy_test.csv:1: even the 0-shot prompt has \d+ tokens"):
        evaluate_mmlu(ColourReader(tokenizer_path, max_seq_length=10), tokenizer, data)


def test_malformed_data_names_the_file_and_line(tokenizer, tokenizer_path, tmp_path):
    model = ColourReader(tokenizer_path)
    rows = {"astronomy": ['"A question\nover two lines?",a,b,c,d,A', "Too few,a,b,c,A"]}
    data = write_mmlu(tmp_path / "columns", test_rows=rows)
    with pytest.raises(MMLUDataError, match=r"astronomy_test.csv:3: expected 6 columns .* found 5"):
        evaluate_mmlu(model, tokenizer, data, shots=0)
    data = write_mmlu(tmp_path / "letter", test_rows={"astronomy": ["Q?,a,b,c,d,A", "Q?,a,b,c,d,E"]})
    with pytest.raises(MMLUDataError, match=r"astronomy_test.csv:2: answer 'E' is not one of A, B, C, D"):
        evaluate_mmlu(model, tokenizer, data, shots=0)
    data = write_mmlu(tmp_path / "nodev", dev_rows={})
    with pytest.raises(MMLUDataError, match=r"astronomy_dev.csv: missing; 5-shot prompts need it"):
        evaluate_mmlu(model, tokenizer, data)
    with pytest.raises(MMLUDataError, match=r"unknown subject\(s\) \['biology'\]"):
        evaluate_mmlu(model, tokenizer, data, subjects=["biology"])
    with pytest.raises(MMLUDataError, match="no test/ folder"):
        evaluate_mmlu(model, tokenizer, tmp_path / "nodev" / "dev")


def _evaluate_on_this_rank(tokenizer_path: str, data: str) -> dict:
    return evaluate_mmlu(ColourReader(tokenizer_path), Tokenizer(tokenizer_path), data, batch_size=2)


@pytest.mark.processes
def test_questions_are_split_over_data_parallel_ranks(tokenizer, tokenizer_path, tmp_path):
    data = write_mmlu(tmp_path)
    expected = evaluate_mmlu(ColourReader(tokenizer_path), tokenizer, data)
    assert run_on_ranks(_evaluate_on_this_rank, tokenizer_path, str(data)) == [expected, expected]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    config = MistralConfig.from_name("tiny", initializer_range=0.2)
    model = Mistral(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.save_pretrained(tmp_path_factory.mktemp("tiny"))


def test_batched_letter_scoring_equals_transformers(tiny_folder, tokenizer, tmp_path):
    data = write_mmlu(tmp_path)
    ours = Mistral.from_pretrained(tiny_folder, torch.float32).eval()
    results = evaluate_mmlu(ours, tokenizer, data, shots=1, batch_size=3)
    theirs = transformers.MistralForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    letter_ids = answer_letter_ids(tokenizer)
    expected = []
    for subject, question in _questions(data, shots=1):
        ids = tokenizer.encode(build_prompt(subject.name, subject.dev[:1], question))
        with torch.no_grad():
            logits = theirs(torch.tensor([ids])).logits[0, -1, letter_ids]
        expected.append("ABCD"[int(logits.argmax())])
    assert [p["prediction"] for p in results["predictions"]] == expected


def test_evaluate_command_writes_json_and_prints_a_table(tiny_folder, tokenizer_path, tmp_path, capsys):
    output = tmp_path / "report" / "mmlu.json"
    argv = [
        "--task",
        "mmlu",
        "--data-dir",
        str(write_mmlu(tmp_path / "mmlu")),
        "--checkpoint",
        str(tiny_folder),
    ]
    argv += ["--tokenizer-model", tokenizer_path, "--subjects", "astronomy", "--output", str(output)]
    assert evaluate_cli.main(argv) == 0
    report = json.loads(output.read_text())
    assert list(report["subjects"]) == ["astronomy"] and report["num_questions"] == 4
    table = capsys.readouterr().out
    assert "astronomy" in table and "all (micro-average)" in table and f"{report['accuracy']:.4f}" in table
    assert cli.main(["evaluate", *argv[:4], "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
