"""`preprocess` over the dataset formats people have: ShareGPT, prompt/completion, `--columns`, `--handler
auto`, and Hugging Face `datasets` folders; ids checked against mistral-common, sentencepiece and `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from helpers.tokenizer_references import CONVERSATION, SHIPPED, answer_labels, finetuning_ids
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

from mistral_lightning.cli.preprocess import main
from mistral_lightning.data.preprocess.config import PreprocessError

KEYS = ("input_ids", "attention_mask", "labels")
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
# CONVERSATION as ShareGPT writes it; the second answer is spelled with the OpenAI names, also accepted.
SHAREGPT = [
    {"from": "system" if m["role"] == "system" else SHAREGPT_FROM[m["role"]], "value": m["content"]}
    for m in CONVERSATION
]
SHAREGPT[3:] = [{"from": "user", "value": CONVERSATION[3]["content"]}, {"from": "assistant", "value": "狗"}]
PAIRS = [
    {"prompt": "The capital of France is", "completion": "Paris."},
    {"prompt": "2 + 2 =", "completion": "4, of course 🙂"},
]
ALPACA = [
    {"instruction": "Reverse the words.", "input": "red cat", "output": "cat red"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _run(tokenizer: str, data, prefix: Path, *options: str) -> None:
    argv = ["--input", str(data), "--tokenizer-model", tokenizer, "--output-prefix", str(prefix), *options]
    assert main(argv) == 0


def _read(prefix: Path, key: str) -> list[list[int]]:
    dataset = MegatronIndexedDataset(f"{prefix}_packed_{key}_document")
    return [np.array(dataset[i]).tolist() for i in range(len(dataset))]


def _outputs(prefix: Path) -> list[bytes]:
    """The bytes of every file an instruction run writes."""
    return [
        Path(f"{prefix}_packed_{key}_document{ext}").read_bytes() for key in KEYS for ext in (".bin", ".idx")
    ]


# ---------------------------------------------------------------------------------------------- ShareGPT


@pytest.mark.parametrize("name", ["v1", "v7"])
def test_sharegpt_is_mistral_commons_encoding_of_the_same_chat(tmp_path, name, capsys):
    tokenizer = str(SHIPPED[name])
    # The system prompt as a turn, and as the separate `system` column some ShareGPT exports have.
    rows = [
        {"conversations": SHAREGPT},
        {"system": CONVERSATION[0]["content"], "conversations": SHAREGPT[1:]},
    ]
    _run(
        tokenizer, _write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "sharegpt", "--handler", "sharegpt"
    )
    expected = finetuning_ids(name, CONVERSATION)
    assert _read(tmp_path / "sharegpt", "input_ids") == [expected, expected]
    assert _read(tmp_path / "sharegpt", "labels") == [answer_labels(name, expected)] * 2
    assert _read(tmp_path / "sharegpt", "attention_mask") == [[1] * len(expected)] * 2
    assert "format:            ShareGPT" in capsys.readouterr().out

    messages = _write_jsonl(tmp_path / "messages.jsonl", [{"messages": CONVERSATION}] * 2)
    _run(tokenizer, messages, tmp_path / "messages", "--handler-name", "MistralInstructionHandler")
    assert _outputs(tmp_path / "sharegpt") == _outputs(tmp_path / "messages")


def test_sharegpt_rows_it_cannot_read_are_named_with_what_was_expected(tmp_path, capsys):
    rows = [
        {"conversations": SHAREGPT},
        {"conversations": [*SHAREGPT[:2], {"from": "tool", "value": "42"}, *SHAREGPT[2:]]},
        {"text": "plain text in a chat file"},
        {"conversations": "not a list"},
    ]
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    _run(str(SHIPPED["v3"]), data, tmp_path / "out", "--handler", "sharegpt")
    summary = capsys.readouterr().out
    assert "documents written: 1" in summary
    assert (
        f"{data} row 2: invalid conversation (turn 2 has from 'tool'; expected one of human, user, gpt, "
        "assistant, system)" in summary
    )
    assert (
        f"{data} row 3: unrecognised format (expected ShareGPT (`conversations`: list of {{from, value}}), "
        "got keys ['text'])" in summary
    )
    assert f"{data} row 4: invalid conversation ('conversations' is not a list of {{from, value}})" in summary


# ------------------------------------------------------------------------------------- prompt/completion


def test_prompt_completion_is_plain_text_with_loss_on_the_completion_and_eos(tmp_path, tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    _run(tokenizer_path, data, tmp_path / "pairs", "--handler", "prompt-completion")
    ids, labels = _read(tmp_path / "pairs", "input_ids"), _read(tmp_path / "pairs", "labels")
    for row, row_ids, row_labels in zip(PAIRS, ids, labels):
        prompt, completion = (
            [sp.bos_id(), *sp.encode(row["prompt"])],
            [*sp.encode(row["completion"]), sp.eos_id()],
        )
        assert row_ids == prompt + completion
        assert row_labels == [-100] * len(prompt) + completion


# ------------------------------------------------------------------------------ --columns and --handler auto


def test_columns_maps_other_names_onto_the_format(tmp_path, tokenizer_path):
    renamed = [{"question": r["instruction"], "input": r["input"], "answer": r["output"]} for r in ALPACA]
    _run(tokenizer_path, _write_jsonl(tmp_path / "a.jsonl", ALPACA), tmp_path / "std", "--handler", "alpaca")
    _run(
        tokenizer_path,
        _write_jsonl(tmp_path / "b.jsonl", renamed),
        tmp_path / "mapped",
        "--handler",
        "alpaca",
        "--columns",
        "instruction=question,output=answer",
    )
    assert _outputs(tmp_path / "mapped") == _outputs(tmp_path / "std")
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "b.parquet")  # parquet reads the mapped columns
    options = ["--handler", "alpaca", "--columns", "instruction=question,output=answer"]
    _run(tokenizer_path, tmp_path / "b.parquet", tmp_path / "parquet", *options)
    assert _outputs(tmp_path / "parquet") == _outputs(tmp_path / "std")
    with pytest.raises(
        PreprocessError,
        match=r"b.jsonl: missing column 'response'; columns found: answer, input, question; expected Alpaca "
        r"\(`question`, `input`, `response`\): map yours with --columns output=YOUR_COLUMN",
    ):
        _run(
            tokenizer_path,
            tmp_path / "b.jsonl",
            tmp_path / "x",
            *["--handler", "alpaca", "--columns", "instruction=question,output=response"],
        )

    # ShareGPT's turn fields too: a `dialog` column of {speaker, text} turns.
    dialog = [{"dialog": [{"speaker": t["from"], "text": t["value"]} for t in SHAREGPT]}]
    sharegpt = _write_jsonl(tmp_path / "c.jsonl", [{"conversations": SHAREGPT}])
    _run(str(SHIPPED["v3"]), sharegpt, tmp_path / "sharegpt", "--handler", "sharegpt")
    options = ["--handler", "sharegpt", "--columns", "conversations=dialog,from=speaker,value=text"]
    _run(str(SHIPPED["v3"]), _write_jsonl(tmp_path / "d.jsonl", dialog), tmp_path / "dialog", *options)
    assert _outputs(tmp_path / "dialog") == _outputs(tmp_path / "sharegpt")


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (
            "answer=output",
            r"--columns answer=output: 'answer' is not a column of Alpaca; map one of instruction, ",
        ),
        ("instruction", r"--columns instruction: write TARGET=SOURCE pairs separated by commas"),
        ("output=a,output=b", r"--columns output=b: 'output' is mapped twice"),
    ],
)
def test_bad_columns_get_one_line(tmp_path, tokenizer_path, columns, message):
    data = _write_jsonl(tmp_path / "a.jsonl", ALPACA)
    with pytest.raises(PreprocessError, match=message):
        _run(tokenizer_path, data, tmp_path / "x", "--handler", "alpaca", "--columns", columns)


def test_auto_picks_the_format_by_columns_and_says_which(tmp_path, tokenizer_path, capsys):
    cases = {
        "sharegpt": ([{"conversations": SHAREGPT}], "ShareGPT"),
        "messages": ([{"messages": CONVERSATION}], "OpenAI messages"),
        "prompt-completion": (PAIRS, "prompt/completion"),
        "alpaca": (ALPACA, "Alpaca"),
    }
    tokenizer = str(SHIPPED["v3"])
    for handler, (rows, label) in cases.items():
        data = _write_jsonl(tmp_path / f"{handler}.jsonl", rows)
        _run(tokenizer, data, tmp_path / f"{handler}_explicit", "--handler", handler)
        capsys.readouterr()
        _run(tokenizer, data, tmp_path / f"{handler}_auto", "--handler", "auto")
        assert (
            f"format:            {label} (--handler auto, from the columns of {data})"
            in capsys.readouterr().out
        )
        assert _outputs(tmp_path / f"{handler}_auto") == _outputs(tmp_path / f"{handler}_explicit")

    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": "Hello world."}])
    _run(tokenizer, text, tmp_path / "text", "--handler", "auto")
    assert "format:            plain text" in capsys.readouterr().out
    assert Path(f"{tmp_path / 'text'}_text_document.bin").is_file()

    renamed = _write_jsonl(tmp_path / "renamed.jsonl", [{"dialog": SHAREGPT}])
    _run(tokenizer, renamed, tmp_path / "renamed", "--handler", "auto", "--columns", "conversations=dialog")
    assert _outputs(tmp_path / "renamed") == _outputs(tmp_path / "sharegpt_explicit")

    unknown = _write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        PreprocessError,
        match=r"--handler auto: .*unknown.jsonl has columns answer, question, which match no format: expected "
        r"preference pairs \(`prompt`.*\), ShareGPT \(`conversations`.*; map yours with --columns",
    ):
        _run(tokenizer, unknown, tmp_path / "unknown", "--handler", "auto")


# ------------------------------------------------------------------------ Hugging Face `datasets` folders


def test_save_to_disk_folders_give_the_same_output_as_jsonl(tmp_path, tokenizer_path):
    train, test = ALPACA, [{"instruction": "Count.", "input": "a b c", "output": "3"}]
    options = ("--handler", "alpaca")
    _run(tokenizer_path, _write_jsonl(tmp_path / "train.jsonl", train), tmp_path / "train", *options)
    _run(tokenizer_path, _write_jsonl(tmp_path / "test.jsonl", test), tmp_path / "test", *options)

    single = tmp_path / "single"
    datasets.Dataset.from_list(train).save_to_disk(str(single), num_shards=2)
    _run(tokenizer_path, single, tmp_path / "from_single", *options)
    assert _outputs(tmp_path / "from_single") == _outputs(tmp_path / "train")

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(splits))
    _run(tokenizer_path, splits, tmp_path / "dict_train", *options)
    _run(tokenizer_path, splits, tmp_path / "dict_test", *options, "--split", "test")
    assert _outputs(tmp_path / "dict_train") == _outputs(tmp_path / "train")
    assert _outputs(tmp_path / "dict_test") == _outputs(tmp_path / "test")
    with pytest.raises(PreprocessError, match=r"--split validation: .*splits has splits train, test"):
        _run(tokenizer_path, splits, tmp_path / "x", *options, "--split", "validation")
    with pytest.raises(PreprocessError, match=r"--split test: .*single holds one dataset without splits"):
        _run(tokenizer_path, single, tmp_path / "x", *options, "--split", "test")
    with pytest.raises(PreprocessError, match=r"--split test: --input .*train.jsonl is not a Hugging Face"):
        _run(tokenizer_path, tmp_path / "train.jsonl", tmp_path / "x", *options, "--split", "test")


@pytest.mark.processes
def test_sharegpt_save_to_disk_matches_jsonl(tmp_path):
    rows = [{"conversations": SHAREGPT}, {"conversations": SHAREGPT[1:]}]
    tokenizer = str(SHIPPED["v3"])
    _run(tokenizer, _write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "jsonl", "--handler", "sharegpt")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    # Workers get the format auto chose: they build their own handler from the run's options.
    _run(tokenizer, tmp_path / "saved", tmp_path / "arrow", "--handler", "auto", "--workers", "2")
    assert _outputs(tmp_path / "arrow") == _outputs(tmp_path / "jsonl")


def test_cached_arrow_files_of_load_dataset_are_read_offline(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    loaded = datasets.load_dataset("json", data_files={"train": str(data)}, cache_dir=str(tmp_path / "cache"))
    cache_folder = Path(loaded["train"].cache_files[0]["filename"]).parent
    options = ("--handler", "prompt-completion")
    _run(tokenizer_path, data, tmp_path / "jsonl", *options)
    _run(tokenizer_path, cache_folder, tmp_path / "cache_out", *options)
    assert _outputs(tmp_path / "cache_out") == _outputs(tmp_path / "jsonl")
    # map() leaves its own cache-<fingerprint>.arrow beside the split's file: it is no split.
    loaded["train"].map(lambda row: {"prompt": row["prompt"].upper()})
    assert len(list(cache_folder.glob("cache-*.arrow"))) == 1
    _run(tokenizer_path, cache_folder, tmp_path / "after_map", *options)
    assert _outputs(tmp_path / "after_map") == _outputs(tmp_path / "jsonl")
    with pytest.raises(
        PreprocessError, match=r"--split test: the datasets folder .* has splits train; choose"
    ):
        _run(tokenizer_path, cache_folder, tmp_path / "x", *options, "--split", "test")
    arrow_file = Path(loaded["train"].cache_files[0]["filename"])
    _run(tokenizer_path, arrow_file, tmp_path / "file_out", *options)
    assert _outputs(tmp_path / "file_out") == _outputs(tmp_path / "jsonl")
