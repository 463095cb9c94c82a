"""The data pipeline fails loudly: a dead preprocess worker, data with no labelled token, corrupt inputs,
token ids beyond the vocabulary and pathological JSON rows each end in one clear line, never a hang,
a traceback or a run that trains on nothing."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from helpers.training import fake_trainer
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

from mistral_lightning.cli import main as cli_main
from mistral_lightning.data.datamodules import InstructionDataModule, PretrainDataModule
from mistral_lightning.data.indexed import IndexedDatasetWriter
from mistral_lightning.data.preprocess.handlers import PretrainHandler
from mistral_lightning.errors import UserError
from mistral_lightning.prompts import alpaca_prompt

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _preprocess(tokenizer_path, data, prefix, *extra) -> int:
    argv = ["preprocess", "--input", str(data), "--tokenizer-model", tokenizer_path]
    return cli_main([*argv, "--output-prefix", str(prefix), *extra])


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------- a dead preprocess worker


def _kill_worker_on(monkeypatch, marker_text: str, only_once: Path | None = None) -> None:
    """Patch the handler so that the process encoding `marker_text` kills itself (forked workers inherit it);
    with `only_once`, only the first time, as a worker killed from outside would be."""
    encode_row = PretrainHandler.encode_row

    def killed_on_marker(self, row):
        if row.get("text") == marker_text and not (only_once and only_once.exists()):
            if only_once:
                only_once.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return encode_row(self, row)

    monkeypatch.setattr(PretrainHandler, "encode_row", killed_on_marker)


def _rows_with_marker(tmp_path) -> Path:
    rows = [{"text": f"row {n}"} for n in range(1, 3501)]
    rows[2499] = {"text": "kill me"}  # row 2500 lies in the chunk of rows 2001-3000
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


@pytest.mark.processes
@pytest.mark.timeout(120)  # guards against the hang this test is about; it asserts no timing
def test_dead_worker_ends_the_run_naming_its_chunk(tmp_path, tokenizer_path, monkeypatch, capsys):
    """A worker killed by SIGKILL on a chunk, every time, is named with that chunk instead of a hang."""
    _kill_worker_on(monkeypatch, "kill me")
    data = _rows_with_marker(tmp_path)
    out = tmp_path / "out"
    out.mkdir()

    code = _preprocess(tokenizer_path, data, out / "x", "--workers", "2", "--log-interval", "100000")

    assert code != 0
    error = _one_line_error(capsys.readouterr().err)
    assert f"{data} rows 2001-3000" in error and "worker" in error
    assert "rows 1001-2000" not in error and "rows 3001-3500" not in error  # chunks it did not kill
    assert list(out.iterdir()) == []  # nothing under the final names, no temporary files either


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_worker_killed_from_outside_suggests_fewer_workers(tmp_path, tokenizer_path, monkeypatch, capsys):
    """Killed once (as by the OOM killer), the chunk encodes fine alone: the advice is fewer --workers."""
    _kill_worker_on(monkeypatch, "kill me", only_once=tmp_path / "killed-once")
    data = _rows_with_marker(tmp_path)
    out = tmp_path / "out"
    out.mkdir()

    assert _preprocess(tokenizer_path, data, out / "x", "--workers", "2", "--log-interval", "100000") == 2
    error = _one_line_error(capsys.readouterr().err)
    assert f"{data} rows 2001-3000" in error and "fewer --workers (now 2)" in error
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- samples without a labelled token

ALPACA_SHORT = {"instruction": "Say hi.", "input": "", "output": "hi there, how are you today"}
ALPACA_LONG = {
    "instruction": "Summarise the following text in one sentence. " * 4,
    "input": "The quick brown fox jumps over the lazy dog. " * 4,
    "output": "A fox jumps over a dog.",
}


def _prompt_tokens(sp: spm.SentencePieceProcessor, row: dict) -> int:
    """BOS plus the Alpaca prompt, tokenized by sentencepiece itself."""
    return 1 + len(sp.encode(alpaca_prompt(row["instruction"], row["input"])))


def test_preprocess_counts_and_warns_about_samples_without_labels(tmp_path, tokenizer_path, capsys):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    seq_length = _prompt_tokens(sp, ALPACA_SHORT) + 3  # the short prompt leaves 3 labelled tokens
    assert _prompt_tokens(sp, ALPACA_LONG) > seq_length  # the long prompt alone fills every position
    rows = [ALPACA_SHORT, ALPACA_LONG, ALPACA_LONG, ALPACA_SHORT, ALPACA_LONG]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = ["--handler-name", "GeneralInstructionHandler", "--seq-length", str(seq_length)]

    assert _preprocess(tokenizer_path, data, tmp_path / "mixed", *options, "--overlong", "truncate") == 0
    summary = capsys.readouterr().out
    labels = MegatronIndexedDataset(str(tmp_path / "mixed_packed_labels_document"))
    written_without = sum(int((np.array(labels[i]) != -100).sum() == 0) for i in range(len(labels)))
    assert written_without == 3  # megatron-core's reader agrees with the hand count
    assert "samples without a labelled token: 3 of 5" in summary

    data.write_text("".join(json.dumps(ALPACA_LONG) + "\n" for _ in range(4)))
    assert _preprocess(tokenizer_path, data, tmp_path / "none", *options, "--overlong", "truncate") == 0
    summary = capsys.readouterr().out
    assert "samples without a labelled token: 4 of 4" in summary
    warning = next(line for line in summary.splitlines() if "warning" in line and "labelled" in line)
    assert "--seq-length" in warning and "--overlong" in warning


def _write_sft(prefix: Path, prompt_lengths: list[int], length: int = 40, token_base: int = 3) -> str:
    """Sample k: `length` tokens, the first `prompt_lengths[k]` of them without a label."""
    with (
        IndexedDatasetWriter(f"{prefix}_packed_input_ids_document", np.uint16) as ids,
        IndexedDatasetWriter(f"{prefix}_packed_labels_document", np.int32) as labels,
    ):
        for prompt in prompt_lengths:
            tokens = token_base + np.arange(length)
            ids.add_document(tokens)
            labels.add_document(np.where(np.arange(length) < prompt, -100, tokens))
        ids.finalize()
        labels.finalize()
    return str(prefix)


def _setup(datamodule, stage="fit", vocab_size=None):
    datamodule.trainer = fake_trainer(vocab_size=vocab_size)
    datamodule.setup(stage)
    return datamodule


def test_fit_refuses_data_where_most_samples_have_no_labelled_token(tmp_path):
    """seq_length 16 keeps stored positions 1..16 after the shift: a sample with a prompt of 30 has no label."""
    mostly_prompt = _write_sft(tmp_path / "mostly", [30] * 6 + [3] * 4)
    with pytest.raises(UserError) as error:
        _setup(InstructionDataModule(mostly_prompt, seq_length=16, split="1", num_workers=0))
    message = str(error.value)
    assert "6 of the first 10 training samples" in message and "\n" not in message
    assert "data.init_args.seq_length" in message and "--overlong" in message
    # Evaluation and a mostly-labelled training set are not refused.
    _setup(InstructionDataModule(mostly_prompt, seq_length=16, split="1", num_workers=0), stage="validate")
    _setup(InstructionDataModule(_write_sft(tmp_path / "mostly_labelled", [30] * 4 + [3] * 6), 16, split="1"))
    # A longer seq_length reaches the answers.
    _setup(InstructionDataModule(mostly_prompt, seq_length=32, split="1", num_workers=0))


def test_cli_fit_on_prompt_only_samples_stops_before_training(tmp_path, tokenizer_path, monkeypatch, capsys):
    """The issue's run: Alpaca data, seq_length shorter than the prompts; fit must not log loss 0 and exit 0."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(ALPACA_LONG) + "\n" for _ in range(40)))
    assert (
        _preprocess(tokenizer_path, data, "data/alpaca", "--handler-name", "GeneralInstructionHandler") == 0
    )
    fit = ["fit", "--config", str(CONFIGS / "tiny" / "finetune.yaml"), "--trainer.max_steps", "2"]
    fit += ["--data.init_args.data_prefix", "data/alpaca", "--data.init_args.seq_length", "32"]
    capsys.readouterr()

    assert cli_main(fit) == 2
    error = _one_line_error(capsys.readouterr().err)
    assert "no labelled token" in error and "data.init_args.seq_length" in error and "--overlong" in error
    assert not (tmp_path / "runs" / "tiny-finetune" / "checkpoints").exists()


# ---------------------------------------------------------------- token ids beyond the vocabulary


def test_token_ids_at_or_beyond_the_vocabulary_are_refused_when_the_data_opens(tmp_path):
    prefix = _write_sft(tmp_path / "sft", [3] * 8, length=20, token_base=990)  # ids 990..1009
    with pytest.raises(UserError) as error:
        _setup(InstructionDataModule(prefix, seq_length=16, split="1", num_workers=0), vocab_size=1009)
    message = str(error.value)
    assert f"{prefix}_packed_input_ids_document.bin" in message and "1009" in message and "\n" not in message
    _setup(InstructionDataModule(prefix, seq_length=16, split="1", num_workers=0), vocab_size=1010)

    with IndexedDatasetWriter(tmp_path / "corpus_text_document", np.uint16) as writer:
        writer.add_document(np.arange(200) % 77)  # largest id 76
        writer.finalize()
    pretrain = PretrainDataModule([str(tmp_path / "corpus_text_document")], seq_length=16, split="1")
    with pytest.raises(UserError, match=r"corpus_text_document\.bin holds token id 76 .* 76 ids"):
        _setup(pretrain, stage="validate", vocab_size=76)


def test_the_largest_token_id_is_computed_once_and_cached_with_the_index_caches(tmp_path):
    prefix = _write_sft(tmp_path / "sft", [3] * 8, length=20)
    _setup(InstructionDataModule(prefix, seq_length=16, split="1", num_workers=0), vocab_size=32000)
    cached = sorted((tmp_path / "index-cache").glob("*.npy"))
    assert len(cached) == 2  # input ids and labels
    for path in cached:  # a cached value is believed without scanning the data again
        np.save(path, np.array(50000))
    with pytest.raises(UserError, match="holds token id 50000"):
        _setup(InstructionDataModule(prefix, seq_length=16, split="1", num_workers=0), vocab_size=32000)
    # Rewritten data is scanned again: the cache is keyed by the data file as it is now.
    _write_sft(tmp_path / "sft", [3] * 8, length=21, token_base=40000)
    with pytest.raises(UserError, match="holds token id 40020"):
        _setup(InstructionDataModule(prefix, seq_length=16, split="1", num_workers=0), vocab_size=32000)


def test_cli_fit_refuses_token_ids_beyond_the_vocabulary_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write_sft(tmp_path / "sft", [3] * 40, length=20, token_base=32000)  # the tiny config has 32000 ids
    fit = ["fit", "--config", str(CONFIGS / "tiny" / "finetune.yaml"), "--trainer.max_steps", "2"]
    fit += ["--data.init_args.data_prefix", str(tmp_path / "sft")]

    assert cli_main(fit) == 2
    error = _one_line_error(capsys.readouterr().err)
    assert "sft_packed_input_ids_document.bin holds token id 32019" in error and "32000" in error


# ---------------------------------------------------------------- corrupt or pathological input


def test_corrupt_parquet_page_names_the_file(tmp_path, tokenizer_path, capsys):
    data = tmp_path / "data.parquet"
    pq.write_table(
        pa.table({"text": [f"row {n} " + "word " * 20 for n in range(3000)]}), data, row_group_size=1000
    )
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2  # inside a data page: the footer still opens, reading the rows fails
    raw[middle : middle + 64] = b"\xff" * 64
    data.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()

    assert _preprocess(tokenizer_path, data, out / "x", "--log-interval", "100000") == 2
    error = _one_line_error(capsys.readouterr().err)
    assert str(data) in error and "corrupt" in error
    assert list(out.iterdir()) == []


DEEP = b'{"text": "deep", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_INT = b'{"text": "huge", "extra": ' + b"9" * 5000 + b"}"


@pytest.mark.parametrize("layout", ["jsonl", "json array"])
def test_pathological_json_rows_are_skipped_and_counted(tmp_path, tokenizer_path, capsys, layout):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    rows = [b'{"text": "good one"}', DEEP, b'{"text": "good two"}', HUGE_INT, b'{"text": "good three"}']
    if layout == "jsonl":
        data = tmp_path / "rows.jsonl"
        data.write_bytes(b"\n".join(rows) + b"\n")
    else:
        data = tmp_path / "rows.json"
        data.write_bytes(b"[\n" + b",\n".join(rows) + b"\n]")

    assert _preprocess(tokenizer_path, data, tmp_path / "out") == 0
    summary = capsys.readouterr().out
    assert "rows read:         5" in summary and "documents written: 3" in summary
    assert "skipped rows:      2" in summary
    assert f"{data} row 2:" in summary and f"{data} row 4:" in summary
    written = MegatronIndexedDataset(str(tmp_path / "out_text_document"))
    expected = [[1, *sp.encode(text)] for text in ("good one", "good two", "good three")]
    assert [np.array(written[i]).tolist() for i in range(len(written))] == expected
