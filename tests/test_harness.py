"""lm-evaluation-harness on our model against lm-eval's own `hf` model (HFLM over transformers) on the same
HF folder: loglikelihoods to 1e-4, the same greedy text, the same rolling log-likelihoods; and the CLI.

The folder holds a tiny random Mistral (window 8, context 64, so windows, truncation and rolling windows
all happen) and the tokenizer.json transformers converts from Mistral's v1 sentencepiece model: we read it
with the `tokenizers` library, transformers with its own tokenizers backend, so both get the same ids and
the comparison is of the models and the request handling. BOS: both sides prepend it to every context
(HFLM add_bos_token=True, ours by default). Rolling log-likelihoods score the text after one BOS; HFLM
does that with add_bos_token=False (with True it scores BOS after BOS too).
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import lm_eval.tasks
import pytest
import torch
import yaml
from helpers.processes import free_port, without_process_group
from helpers.tokenizer_references import SHIPPED
from lm_eval.api.instance import Instance
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import LlamaTokenizer

from mistral_lightning import Mistral, MistralConfig, cli
from mistral_lightning.cli import evaluate as evaluate_cli
from mistral_lightning.evaluation.harness import MistralLightningLM
from mistral_lightning.evaluation.harness import run as harness_run
from mistral_lightning.evaluation.mmlu import evaluate_mmlu
from mistral_lightning.tokenizer import Tokenizer

CONFIG = MistralConfig(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    sliding_window=8,
    max_seq_length=64,
    initializer_range=0.2,  # peaked next-token distributions: greedy choices far from ties
)
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 10)  # about 100 tokens: beyond the context
MC_DOCS = [
    {"question": "What color is the sky?", "choices": ["blue", "green", "bright red"], "answer": 0},
    {"question": "Which animal barks?", "choices": ["A dog", "A cat", "A small fish"], "answer": 0},
    {"question": "Pick the third letter.", "choices": ["A", "B", "C", "D"], "answer": 2},  # one-token answers
    {"question": LONG, "choices": ["yes", "no"], "answer": 1},  # truncated from the left
]
GEN_DOCS = [
    {"prompt": "Once upon a time", "target": "there"},
    {"prompt": "The capital of France is", "target": "Paris"},
    {"prompt": LONG, "target": "dog"},
]
PPL_DOCS = [{"text": "A short text."}, {"text": LONG}]  # the long one spans two rolling windows
TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]


def _task(name: str, data: Path, cache: Path, **fields) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "test_split": "test",
        **fields,
    }


def write_tasks(folder: Path) -> Path:
    """Three harness tasks over local jsonl files: multiple choice, generate_until, loglikelihood_rolling."""
    folder.mkdir(parents=True)
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS), ("ppl", PPL_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    cache = folder / "datasets_cache"
    tasks = [
        _task(
            "tiny_mc",
            folder / "mc.jsonl",
            cache,
            output_type="multiple_choice",
            doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_choice="{{choices}}",
            doc_to_target="{{answer}}",
            metric_list=[{"metric": "acc"}],
        ),
        _task(
            "tiny_gen",
            folder / "gen.jsonl",
            cache,
            output_type="generate_until",
            doc_to_text="{{prompt}}",
            doc_to_target="{{target}}",
            generation_kwargs={"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False},
            metric_list=[{"metric": "exact_match"}],
        ),
        _task(
            "tiny_ppl",
            folder / "ppl.jsonl",
            cache,
            output_type="loglikelihood_rolling",
            doc_to_text="",
            doc_to_target="{{text}}",
            metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        ),
    ]
    for task in tasks:
        (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("harness") / "hf"
    torch.manual_seed(0)
    model = Mistral(CONFIG)
    model.init_weights()
    model.save_pretrained(folder, dtype=torch.float32)
    sentencepiece = folder.parent / "sentencepiece"
    sentencepiece.mkdir()
    shutil.copy(SHIPPED["v1"], sentencepiece / "tokenizer.model")
    # tokenizer.json and tokenizer_config.json (which names BOS and EOS), no tokenizer.model.
    LlamaTokenizer.from_pretrained(sentencepiece).save_pretrained(folder)
    assert Tokenizer(folder).kind == "hf-json"
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("harness") / "tasks")


@pytest.fixture(scope="module")
def hflm(hf_folder) -> HFLM:
    return HFLM(pretrained=str(hf_folder), device="cpu", dtype="float32", add_bos_token=True, batch_size=3)


@pytest.fixture(scope="module")
def ours(hf_folder) -> MistralLightningLM:
    return MistralLightningLM.create_from_arg_string(
        f"checkpoint={hf_folder},dtype=float32,device=cpu", {"batch_size": 3}
    )


def _evaluate(lm, task_folder: Path, tasks: list[str]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Each task's samples (by document) and metrics."""
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
        bootstrap_iters=0,
    )
    samples = {task: sorted(rows, key=lambda row: row["doc_id"]) for task, rows in results["samples"].items()}
    return samples, results["results"]


@pytest.fixture(scope="module")
def reference(hflm, task_folder) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """lm-eval's hf model on every task; the rolling one with one BOS before the text (add_bos_token=False)."""
    samples, metrics = _evaluate(hflm, task_folder, ["tiny_mc", "tiny_gen"])
    one_bos = HFLM(pretrained=hflm.model, tokenizer=hflm.tokenizer, add_bos_token=False, batch_size=3)
    rolling_samples, rolling_metrics = _evaluate(one_bos, task_folder, ["tiny_ppl"])
    return {**samples, **rolling_samples}, {**metrics, **rolling_metrics}


@pytest.mark.processes
def test_loglikelihoods_and_greedy_text_equal_lm_evals_hf_model(ours, reference, task_folder):
    mine, theirs = _evaluate(ours, task_folder, ["tiny_mc", "tiny_gen"])[0], reference[0]
    for row, expected_row in zip(mine["tiny_mc"], theirs["tiny_mc"], strict=True):
        for (logprob, greedy), (expected, expected_greedy) in zip(
            (resp[0] for resp in row["resps"]), (resp[0] for resp in expected_row["resps"]), strict=True
        ):
            assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy, row["doc"]
    texts = [row["resps"][0][0] for row in mine["tiny_gen"]]
    assert texts == [row["resps"][0][0] for row in theirs["tiny_gen"]]
    assert all(texts), texts  # the model generated something for every prompt


@pytest.mark.processes
def test_rolling_loglikelihood_equals_lm_evals_hf_model_after_one_bos(ours, reference, task_folder):
    mine = _evaluate(ours, task_folder, ["tiny_ppl"])[0]["tiny_ppl"]
    for row, expected_row in zip(mine, reference[0]["tiny_ppl"], strict=True):
        assert row["resps"][0][0] == pytest.approx(expected_row["resps"][0][0], abs=1e-4)
    assert len(ours.tok_encode(LONG, add_special_tokens=False)) > CONFIG.max_seq_length  # two windows


def test_generate_until_stops_at_a_stop_string_as_lm_evals_hf_model(ours, hflm):
    def generate(lm, until: list[str]) -> list[str]:
        options = {"until": until, "max_gen_toks": 12, "do_sample": False}
        requests = [
            Instance("generate_until", {}, (doc["prompt"], dict(options)), index)
            for index, doc in enumerate(GEN_DOCS)
        ]
        return lm.generate_until(requests)

    free = generate(hflm, [])
    assert generate(ours, []) == free
    # A stop string from the middle of the first text: the output ends just before it.
    stop = free[0][len(free[0]) // 2 :][:2]
    expected = [text[: text.index(stop)] if stop in text else text for text in free]
    assert expected[0] != free[0]
    assert generate(ours, [stop]) == generate(hflm, [stop]) == expected


@pytest.mark.processes
def test_evaluate_harness_on_two_ranks_writes_lm_evals_results(hf_folder, task_folder, tmp_path, reference):
    """`evaluate --harness` as torchrun starts it on two CPU ranks: lm-eval splits the documents over the
    ranks, rank 0 gathers them, prints lm-eval's table and writes the report with the hf model's metrics."""
    output = tmp_path / "results.json"
    argv = ["evaluate", "--harness", "--tasks", ",".join(TASKS), "--include-path", str(task_folder)]
    argv += ["--checkpoint", str(hf_folder), "--device", "cpu", "--dtype", "float32", "--batch-size", "2"]
    argv += ["--output", str(output)]
    env = {**without_process_group(os.environ), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(WORLD_SIZE="2", OMP_NUM_THREADS="1")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "mistral_lightning", *argv],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    (table, err0), (nothing, err1) = [rank.communicate(timeout=300) for rank in ranks]
    code0, code1 = (rank.returncode for rank in ranks)
    assert (code0, code1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert "|tiny_mc " in table and "|acc " in table and f"wrote {output}" in table and nothing == ""
    report = json.loads(output.read_text())
    assert report["task"] == "lm-eval-harness" and report["checkpoint"] == str(hf_folder)
    assert report["n-samples"]["tiny_mc"]["effective"] == len(MC_DOCS)  # both ranks' documents
    expected = reference[1]
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_gen", "exact_match,none")):
        assert report["results"][task][metric] == expected[task][metric]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert report["results"]["tiny_ppl"][metric] == pytest.approx(expected["tiny_ppl"][metric], rel=1e-5)
    # A second run refuses to replace the report without --overwrite, before loading anything.
    assert cli.main(argv) == 2


@pytest.mark.processes
def test_lm_evals_own_command_line_runs_the_registered_model(
    hf_folder, task_folder, reference, monkeypatch, capsys
):
    """`python -m mistral_lightning.evaluation.harness` is `lm_eval` with our model registered; a bad
    model_args key is one line."""
    # lm-eval's command line indexes its ~15,000 built-in tasks (seconds); the test's tasks are all local.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))

    def lm_eval_main(model_args: str) -> int:
        argv = ["lm_eval", "--model", "mistral-lightning", "--model_args", model_args, "--tasks", "tiny_mc"]
        monkeypatch.setattr(sys, "argv", [*argv, "--include_path", str(task_folder), "--batch_size", "4"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("mistral_lightning.evaluation.harness", run_name="__main__")
        return exit_.value.code

    assert lm_eval_main(f"checkpoint={hf_folder},dtype=float32") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("|tiny_mc"))
    cells = [cell.strip() for cell in row.split("|")]
    assert float(cells[cells.index("acc") + 2]) == pytest.approx(reference[1]["tiny_mc"]["acc,none"]), row
    assert lm_eval_main(f"checkpoint={hf_folder},window=4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mistral-lightning: error: model_args window: unknown to mistral-lightning"), (
        err
    )


def test_an_unknown_task_is_one_line_before_the_model_loads(task_folder, tmp_path, monkeypatch, capsys):
    # Built-in tasks left out of the index (indexing them takes seconds); "tiny_nope" is in neither.
    monkeypatch.setattr(harness_run, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    argv = ["evaluate", "--harness", "--tasks", "tiny_mc,tiny_nope", "--include-path", str(task_folder)]
    argv += ["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "report.json")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    expected = f"mistral-lightning evaluate: error: --tasks tiny_nope: not in lm-eval's tasks or --include-path {task_folder};"
    assert err.startswith(expected) and err.count("\n") == 1, err  # named before the missing checkpoint


def test_missing_lm_eval_is_one_line(monkeypatch, hf_folder, capsys):
    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in [name for name in sys.modules if name.startswith("mistral_lightning.evaluation.harness")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without lm-eval imports
    argv = [
        "evaluate",
        "--harness",
        "--tasks",
        "hellaswag",
        "--checkpoint",
        str(hf_folder),
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"mistral-lightning evaluate: error: {evaluate_cli.LM_EVAL_MISSING}\n"


def test_mmlu_shows_its_progress_on_stderr(ours, tmp_path, capsys):
    """The recipe's own --task mmlu counts the questions it has scored (the real test set has 14,042)."""
    (tmp_path / "test").mkdir()
    rows = [f"Question {index}?,one,two,three,four,{'ABCD'[index % 4]}\n" for index in range(5)]
    (tmp_path / "test" / "tiny_test.csv").write_text("".join(rows))
    results = evaluate_mmlu(ours.model, ours.tokenizer, tmp_path, shots=0, batch_size=2)
    assert results["num_questions"] == 5
    progress = capsys.readouterr().err
    # The bar starts at 0 of the 5 questions (later refreshes depend on the clock) and is cleared when done.
    assert "MMLU questions:   0%|" in progress and "0/5" in progress and "\n" not in progress, progress
