"""`mistral-lightning preprocess`: outputs checked with megatron-core's reader and sentencepiece/mistral-common."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from helpers.tokenizer_references import (
    CONVERSATION,
    SHIPPED,
    answer_labels,
    finetuning_ids,
    write_tokenizer_json_only,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_lightning.cli.preprocess import main
from mistral_lightning.data.preprocess.config import PreprocessError

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Hello world.", "A second, longer document about cats and dogs.", "短い文書"]
ALPACA = [
    {"instruction": "Reverse the words.", "input": "red cat", "output": "cat red"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _run(tokenizer_path, input_path, prefix, *extra) -> None:
    assert (
        main(
            [
                "--input",
                str(input_path),
                "--tokenizer-model",
                tokenizer_path,
                "--output-prefix",
                str(prefix),
                *extra,
            ]
        )
        == 0
    )


def _read(prefix) -> list[np.ndarray]:
    dataset = MegatronIndexedDataset(str(prefix))
    return [
        np.array(dataset[i]) for i in range(len(dataset))
    ]  # copies: the views die with the dataset's mmap


def test_pretrain_documents_are_bos_text_eos(tmp_path, tokenizer_path, capsys):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": text, "other": 1} for text in TEXTS])
    _run(tokenizer_path, data, tmp_path / "out" / "alpaca", "--append-eod")

    documents = _read(tmp_path / "out" / "alpaca_text_document")
    assert [d.tolist() for d in documents] == [[1, *sp.encode(text), 2] for text in TEXTS]
    assert documents[0].dtype == np.uint16
    out = capsys.readouterr()
    assert "documents written: 3" in out.out and "tokens/s" in out.err


def test_alpaca_instruction_outputs_and_masks(tmp_path, tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    data = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA), data)
    _run(
        tokenizer_path,
        data,
        tmp_path / "alpaca",
        "--handler-name",
        "GeneralInstructionHandler",
        "--append-eod",
    )

    ids, masks, labels = (
        _read(tmp_path / f"alpaca_packed_{key}_document") for key in ("input_ids", "attention_mask", "labels")
    )
    assert ids[0].dtype == np.uint16 and labels[0].dtype == np.int32
    for row, input_ids, mask, label in zip(ALPACA, ids, masks, labels):
        prompt = (
            "\nBelow is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request. Please note that you need to think "
            f"through your response logically and step by step.\n### Instruction:\n{row['instruction']}\n"
            f"{row['input']}\n### Response:\n"
        )
        expected = [1, *sp.encode(prompt + row["output"] + "\n"), 2]
        prompt_length = 1 + len(sp.encode(prompt))
        assert input_ids.tolist() == expected
        assert mask.tolist() == [1] * len(expected)
        assert label.tolist() == [-100] * prompt_length + expected[prompt_length:]


def test_mistral_handler_matches_mistral_common(tmp_path, tokenizer_path):
    reference = MistralTokenizer.v1()
    conversation = [
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "Second answer."},
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    _run(tokenizer_path, data, tmp_path / "chat", "--handler-name", "MistralInstructionHandler")

    request = ChatCompletionRequest(
        messages=[
            UserMessage(content="First question?"),
            AssistantMessage(content="First answer."),
            UserMessage(content="Second?"),
            AssistantMessage(content="Second answer.", prefix=True),
        ]
    )
    expected = reference.encode_chat_completion(request).tokens + [2]
    assert _read(tmp_path / "chat_packed_input_ids_document")[0].tolist() == expected


@pytest.mark.processes
def test_workers_give_byte_identical_files(tmp_path, tokenizer_path):
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"])
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(2500)]
    texts[17] = None  # a skipped row must not shift anything either
    data = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), data, row_group_size=700)
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}" / "data"
        _run(
            tokenizer_path, data, prefix, "--workers", str(workers), "--append-eod", "--log-interval", "1000"
        )
        outputs[workers] = [
            (prefix.parent / f"data_text_document{ext}").read_bytes() for ext in (".bin", ".idx")
        ]
    assert outputs[1] == outputs[2]


def test_input_folder_glob_and_json_array(tmp_path, tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    folder = tmp_path / "in"
    folder.mkdir()
    _write_jsonl(folder / "b.jsonl", [{"text": TEXTS[1]}])
    (folder / "a.json").write_text(json.dumps([{"text": TEXTS[0]}]))
    (folder / "c.jsonl").write_text("")  # an empty shard is reported, not fatal
    pq.write_table(pa.table({"text": [TEXTS[2]]}), folder / "d.parquet")
    (folder / "notes.txt").write_text("ignored: not a data file")
    expected = [[1, *sp.encode(text)] for text in TEXTS]
    for spec in (folder, f"{folder}/[a-d].*"):
        prefix = tmp_path / "out" / "x"
        _run(tokenizer_path, spec, prefix)
        assert [d.tolist() for d in _read(f"{prefix}_text_document")] == expected


@pytest.mark.processes
def test_recipe_option_spellings(tmp_path, tokenizer_path):
    hf_folder = tmp_path / "Mistral-7B-Instruct-v0.2"
    hf_folder.mkdir()
    shutil.copy(tokenizer_path, hf_folder / "tokenizer.model")
    data = _write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    assert (
        main(
            [
                "--input",
                str(data),
                "--tokenizer-name-or-path",
                str(hf_folder),
                "--tokenizer-type",
                "PretrainedFromHF",
                "--tokenizer-not-use-fast",
                "--output-prefix",
                str(tmp_path / "alpaca"),
                "--handler-name",
                "GeneralInstructionHandler",
                "--append-eod",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    assert len(_read(tmp_path / "alpaca_packed_labels_document")) == 2


def test_bad_rows_are_skipped_and_counted(tmp_path, tokenizer_path, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": null}\n'
        b'{"text": "bad \xff\xfe bytes"}\n'
        b'{"text": "' + b"word " * 50 + b'"}\n'
        b'{"text": 12}\n'
        b"not json\n"
        b'{"text": "good two"}\n'
    )
    _run(tokenizer_path, data, tmp_path / "out", "--seq-length", "20")
    summary = capsys.readouterr().out
    assert "rows read:         7" in summary and "documents written: 2" in summary
    for reason in (
        "null or missing field: 1",
        "non-UTF-8 bytes: 1",
        "longer than --seq-length: 1",
        "non-text field: 1",
        "invalid JSON: 1",
    ):
        assert reason in summary
    assert f"{data} row 3: non-UTF-8 bytes" in summary
    assert len(_read(tmp_path / "out_text_document")) == 2


@pytest.mark.processes
def test_skipped_rows_are_located_by_their_chunk_origin(tmp_path, tokenizer_path, capsys):
    """Each chunk brings its file and first row back from the worker, so later chunks and files are named right."""
    folder = tmp_path / "in"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", [{"text": "first file"}] * 10)
    rows = [{"text": f"row {n}"} for n in range(1, 2501)]
    rows[1499] = {"text": None}  # row 1500: inside the second chunk of b.jsonl
    _write_jsonl(folder / "b.jsonl", rows)
    _run(tokenizer_path, folder, tmp_path / "out", "--workers", "2", "--log-interval", "10000")
    summary = capsys.readouterr().out
    assert f"{folder / 'b.jsonl'} row 1500: null or missing field (text)" in summary
    assert "documents written: 2509" in summary


def test_truncate_policy_cuts_to_seq_length(tmp_path, tokenizer_path, capsys):
    data = _write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 50}, {"text": "short"}])
    _run(
        tokenizer_path, data, tmp_path / "out", "--seq-length", "20", "--overlong", "truncate", "--append-eod"
    )
    assert [len(d) for d in _read(tmp_path / "out_text_document")] == [20, 3]
    assert "truncated rows:    1" in capsys.readouterr().out


def test_empty_input_is_an_error_and_leaves_no_files(tmp_path, tokenizer_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(PreprocessError, match=f"{data}.*holds no rows"):
        _run(tokenizer_path, data, tmp_path / "out" / "x")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_missing_column_names_it_and_lists_found(tmp_path, tokenizer_path, kind):
    data = tmp_path / f"data.{kind}"
    rows = [{"instruction": "x", "response": "y"}]
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), data)
    else:
        _write_jsonl(data, rows)
    with pytest.raises(
        PreprocessError, match=r"missing column 'output'; columns found: instruction, response"
    ):
        _run(tokenizer_path, data, tmp_path / "x", "--handler-name", "GeneralInstructionHandler")


@pytest.mark.processes
def test_cli_reports_errors_without_traceback(tmp_path, tokenizer_path):
    command = [sys.executable, "-m", "mistral_lightning", "preprocess"]
    help_text = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--seq-length" in help_text and "skip drops rows" in help_text and "(default: skip)" in help_text
    result = subprocess.run(
        [
            *command,
            "--input",
            str(tmp_path / "nope.parquet"),
            "--tokenizer-model",
            tokenizer_path,
            "--output-prefix",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "nope.parquet matches no file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.processes
@pytest.mark.parametrize("command", ["preprocess", "demo-data"])
def test_help_loads_neither_torch_nor_lightning(command):
    """Data commands must not pay for torch at start-up: --help imports the whole command, never torch."""
    script = (
        "import sys\n"
        "from mistral_lightning.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'pytorch_lightning'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "usage: mistral-lightning" in result.stdout
    assert result.stdout.splitlines()[-1] == "[]"


def _solve(question: str) -> str:
    """The demo tasks, solved independently of the generator."""
    count_prefix = "How many words are there? "
    if question.startswith(count_prefix):
        return str(len(question.removeprefix(count_prefix).split()))
    instruction, _, words = question.partition(". ")
    return {
        "Reverse the order of the words": " ".join(reversed(words.split())),
        "Write the words in capital letters": words.upper(),
        "Repeat the words twice": f"{words} {words}",
    }[instruction]


def test_demo_data_is_deterministic_correct_and_held_out(tmp_path, tokenizer_path):
    import csv

    from mistral_lightning.cli.demo_data import main as demo_main
    from mistral_lightning.demo.data import write_demo_data

    assert (
        demo_main(
            [
                "--out",
                str(tmp_path / "a"),
                "--train-rows",
                "300",
                "--heldout-rows",
                "60",
                "--mmlu-test-per-subject",
                "10",
            ]
        )
        == 0
    )
    paths = write_demo_data(tmp_path / "b", train_rows=300, heldout_rows=60, mmlu_test_per_subject=10)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 2 + 4 * 2  # alpaca/, preference/ (tests/test_data_preference.py), mmlu/
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)

    train, heldout = (pq.read_table(p).to_pylist() for p in (paths.train, paths.heldout))
    assert list(train[0]) == ["instruction", "input", "output", "text"]
    written = [r for r in train if r["instruction"].startswith("Write a multiple choice question")]
    plain = [r for r in train + heldout if r not in written]
    assert len(written) == 300 // 5 and len(plain) == 300 - 300 // 5 + 60
    assert all(_solve(f"{r['instruction']} {r['input']}") == r["output"] for r in plain)
    for row in written:  # MMLU's own layout, ending in the letter of the right choice
        question, *choices, answer = row["output"].split("\n")
        assert [c[:3] for c in choices] == ["A. ", "B. ", "C. ", "D. "] and answer[:8] == "Answer: "
        assert choices["ABCD".index(answer[8:])][3:] == _solve(question)
    train_questions = {f"{r['instruction']} {r['input']}" for r in train if r not in written}
    assert not train_questions & {f"{r['instruction']} {r['input']}" for r in heldout}

    letters = []
    for split in ("dev", "test"):
        for csv_file in sorted((paths.mmlu / split).glob(f"*_{split}.csv")):
            for question, *choices, answer in csv.reader(csv_file.open(encoding="utf-8")):
                assert len(choices) == 4 and len(set(choices)) == 4
                assert choices["ABCD".index(answer)] == _solve(question)
                assert split == "dev" or question not in train_questions
                letters.append(answer)
    assert set(letters) == set("ABCD")

    _run(
        tokenizer_path,
        paths.train,
        tmp_path / "sft",
        "--handler-name",
        "GeneralInstructionHandler",
        "--append-eod",
    )
    assert len(_read(tmp_path / "sft_packed_input_ids_document")) == 300


# ---------------------------------------------------------------- every Mistral tokenizer (issue 13)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_mistral_handler_writes_mistral_common_finetuning_ids_for_every_tokenizer(tmp_path, name):
    single = [{"role": "user", "content": "Say hi 👋"}, {"role": "assistant", "content": "hi"}]
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": single}])
    _run(str(SHIPPED[name]), data, tmp_path / "chat", "--handler-name", "MistralInstructionHandler")

    ids, masks, labels = (
        _read(tmp_path / f"chat_packed_{key}_document") for key in ("input_ids", "attention_mask", "labels")
    )
    for messages, row_ids, row_mask, row_labels in zip((CONVERSATION, single), ids, masks, labels):
        expected = finetuning_ids(name, messages)
        assert row_ids.tolist() == expected
        assert row_mask.tolist() == [1] * len(expected)
        assert row_labels.tolist() == answer_labels(name, expected)


def test_preprocess_with_only_tokenizer_json_writes_the_tokenizers_library_ids(tmp_path):
    import tokenizers

    folder = write_tokenizer_json_only(tmp_path / "hf")
    library = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos, eos = library.token_to_id("<s>"), library.token_to_id("</s>")
    texts = [*TEXTS, "  leading spaces 🙂"]
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": text} for text in texts])
    args = ["--tokenizer-type", "PretrainedFromHF", "--append-eod"]
    _run(str(folder), data, tmp_path / "out", *args)

    expected = [[bos, *library.encode(text, add_special_tokens=False).ids, eos] for text in texts]
    assert [d.tolist() for d in _read(tmp_path / "out_text_document")] == expected


def test_chat_data_with_only_tokenizer_json_is_refused_before_any_row(tmp_path):
    folder = write_tokenizer_json_only(tmp_path / "hf")
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(
        PreprocessError, match="MistralInstructionHandler: .*with only tokenizer.json, the chat format"
    ):
        _run(str(folder), data, tmp_path / "chat", "--handler-name", "MistralInstructionHandler")
    with pytest.raises(PreprocessError, match="holds only tokenizer.json.*--tokenizer-not-use-fast"):
        _run(str(folder), data, tmp_path / "chat", "--tokenizer-not-use-fast")
    assert not list(tmp_path.glob("chat_*"))


def test_a_conversation_the_format_cannot_encode_is_skipped_naming_file_and_row(tmp_path, capsys):
    rows = [
        {"messages": CONVERSATION},
        {"messages": CONVERSATION[:-1]},  # ends on a user turn: nothing to learn
        {"messages": [{"role": "tool", "content": "42"}, *CONVERSATION[1:]]},
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    _run(str(SHIPPED["v3"]), data, tmp_path / "chat", "--handler-name", "MistralInstructionHandler")
    summary = capsys.readouterr().out
    assert "documents written: 1" in summary and "invalid conversation: 2" in summary
    assert (
        f"{data} row 2: invalid conversation (mistral-common v3 (sentencepiece) cannot encode this "
        "conversation: Expected last role Assistant for finetuning but got user)" in summary
    )
    assert f"{data} row 3: invalid conversation (message 0 has role 'tool'" in summary


@pytest.mark.parametrize(
    ("tokenizer", "message"),
    [
        ("vocab.txt", "unknown tokenizer file .*vocab.txt"),
        ("empty", "tokenizer folder .*empty has no tokenizer"),
    ],
)
def test_bad_tokenizers_get_one_line(tmp_path, capsys, tokenizer, message):
    from mistral_lightning.cli import main as cli_main

    (tmp_path / "vocab.txt").write_text("a\n")
    (tmp_path / "empty").mkdir()
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": "x"}])
    argv = ["preprocess", "--input", str(data), "--tokenizer-model", str(tmp_path / tokenizer)]
    assert cli_main([*argv, "--output-prefix", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error)
