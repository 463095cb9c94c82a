"""Outputs never destroy what the user owns, and every write failure is one line (issue 14 items 1 and 6).

Each writer (`convert` HF and Megatron savers, `export`, `evaluate --output`, predict's JSONL writer,
`preprocess`) is run through its command or its Lightning hook. Crashes are real process exits
(`os._exit` in a child, at a chosen file-system call); full disks and read-only folders are OS errors
injected at the call that meets them, because this suite cannot fill a disk or revoke root's rights.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.mmlu import write_mmlu
from safetensors import SafetensorError
from safetensors.torch import load_file

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.checkpoint import hf, megatron
from mistral_lightning.cli import main as cli_main

TINY = MistralConfig.from_name("tiny", vocab_size=64)
HF_FILES = ["config.json", "generation_config.json", "model.safetensors"]


@pytest.fixture(scope="module")
def hf_in(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Mistral(TINY)
    model.init_weights()
    return model.to(torch.bfloat16).save_pretrained(tmp_path_factory.mktemp("source") / "hf_in")


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(argv)
    return code, capsys.readouterr().err


def _one_line_error(argv: list[str], capsys) -> str:
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _convert(hf_in: Path, out: Path | str, *extra: str) -> list[str]:
    return [
        "convert",
        "--loader",
        "hf",
        "--saver",
        "hf",
        "--load-dir",
        str(hf_in),
        "--save-dir",
        str(out),
        *extra,
    ]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------- what is never replaced


def test_the_current_directory_is_never_an_output(hf_in, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work.txt").write_text("mine")
    for argv in (
        _convert(hf_in, "."),
        _convert(hf_in, ".", "--overwrite"),
        _convert(hf_in, "..", "--overwrite"),
    ):
        err = _one_line_error(argv, capsys)
        assert "current directory" in err and "choose a new folder" in err
    err = _one_line_error(["export", "--checkpoint", "x.ckpt", "--out", ".", "--overwrite"], capsys)
    assert "no such checkpoint" in err  # the source is checked first; nothing was touched either way
    assert _listing(tmp_path) == ["work.txt"]


@pytest.mark.parametrize("relation", ["the input", "its parent"])
def test_the_input_folder_and_its_parents_are_never_an_output(hf_in, capsys, relation):
    before = {p.name: p.read_bytes() for p in hf_in.iterdir()}
    out = hf_in if relation == "the input" else hf_in.parent
    err = _one_line_error(_convert(hf_in, out, "--overwrite"), capsys)
    assert f"the --load-dir source ({hf_in})" in err
    assert ("it is the --load-dir" if relation == "the input" else "it holds the --load-dir") in err
    assert {p.name: p.read_bytes() for p in hf_in.iterdir()} == before


def test_overwrite_names_the_files_that_are_not_a_previous_output(hf_in, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(_convert(hf_in, out)) == 0
    (out / "notes.md").write_text("mine")
    (out / "runs").mkdir()
    (out / "runs" / "log.csv").write_text("mine too")
    err = _one_line_error(_convert(hf_in, out, "--overwrite"), capsys)
    assert "notes.md, runs/log.csv" in err and "move those files away" in err
    assert (out / "notes.md").read_text() == "mine" and (out / "runs" / "log.csv").read_text() == "mine too"
    # A folder of only tokenizer files is someone's tokenizer, not a previous export.
    tokenizer_only = tmp_path / "tok"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer.json").write_text("{}")
    err = _one_line_error(_convert(hf_in, tokenizer_only, "--overwrite"), capsys)
    assert "has no config.json, so it is not a previous HF model folder" in err
    assert _listing(tokenizer_only) == ["tokenizer.json"]


# ---------------------------------------------------------------------------- crashes and leftovers

_CRASHING_CONVERT = """
import os, sys
from pathlib import Path
from mistral_lightning.cli import main
crash_at = sys.argv[1]
if crash_at == "swap":  # the previous output is moved aside; the process dies before the new one moves in
    rename = os.rename
    def dying_rename(src, dst):
        if ".partial-" in str(src):
            os._exit(9)
        return rename(src, dst)
    os.rename = dying_rename
else:  # the process dies while writing the weights
    from mistral_lightning.checkpoint import hf
    hf.save_file = lambda *args, **kwargs: os._exit(9)
main(sys.argv[2:])
"""


def _crash(at: str, argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CRASHING_CONVERT, at, *argv], capture_output=True, text=True
    )
    assert result.returncode == 9, result.stderr


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.processes
@pytest.mark.parametrize("at", ["write", "swap"])
def test_a_crash_leaves_the_previous_output_and_the_next_run_cleans_up(hf_in, tmp_path, at):
    out = tmp_path / "out"
    assert cli_main(_convert(hf_in, out, "--dtype", "fp32")) == 0
    previous = _weights(out)
    _crash(at, _convert(hf_in, out, "--overwrite"))
    leftovers = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name != "out")
    if at == "write":  # the old output never left its name; the half-written one is hidden
        assert leftovers == [".out.partial"]
        kept = out
    else:  # the old output is whole under its aside name, the new one whole but unpublished
        assert leftovers == [".out.old", ".out.partial"] and not out.exists()
        (kept,) = tmp_path.glob(".out.old-*")
        (new,) = tmp_path.glob(".out.partial-*")
        assert {t.dtype for t in _weights(new).values()} == {torch.bfloat16}
    assert _listing(kept) == HF_FILES
    assert all(torch.equal(tensor, previous[name]) for name, tensor in _weights(kept).items())

    # The next run that writes there recognises the dead run's temporaries and removes (or restores) them.
    assert cli_main(_convert(hf_in, out, "--overwrite")) == 0
    assert _listing(tmp_path) == ["out"]
    assert {t.dtype for t in _weights(out).values()} == {torch.bfloat16}


@pytest.mark.processes
def test_temporaries_of_live_writers_are_left_alone(hf_in, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    mine = [tmp_path / f".out.partial-{dead_pid}-0a1b2c3d", tmp_path / f"out.tmp-{dead_pid}"]
    live = [tmp_path / f".out.partial-{os.getppid()}-0a1b2c3d", tmp_path / ".other.partial-1-0a1b2c3d"]
    for folder in (mine[0], live[0], live[1]):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    mine[1].write_text("half")
    assert cli_main(_convert(hf_in, tmp_path / "out")) == 0
    assert _listing(tmp_path) == sorted(["out", live[0].name, live[1].name])


# ---------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
@pytest.mark.parametrize("saver", ["hf", "megatron"])
def test_outputs_take_the_users_umask(hf_in, tmp_path, umask, file_mode, folder_mode, saver):
    previous = os.umask(umask)
    try:
        argv = ["convert", "--loader", "hf", "--saver", saver, "--load-dir", str(hf_in)]
        assert cli_main([*argv, "--save-dir", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    modes = {
        p.is_dir(): stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    }
    assert modes == {True: folder_mode, False: file_mode}


# ---------------------------------------------------------------------------- full disk, read-only folder


def _full_disk_in_safetensors(*args, **kwargs):
    # What safetensors raises when the disk fills (seen on a 64 KiB tmpfs).
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _full_disk_in_torch_save(*args, **kwargs):
    # What torch.save to a Python file raises when the disk fills: the OSError is the context.
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


@pytest.mark.parametrize(
    ("saver", "owner", "attribute", "fault"),
    [
        ("hf", hf, "save_file", _full_disk_in_safetensors),
        ("hf", hf, "save_file", OSError(errno.ENOSPC, "No space left on device")),
        ("megatron", megatron.torch, "save", _full_disk_in_torch_save),
    ],
    ids=["hf_safetensors", "hf_oserror", "megatron_torch_save"],
)
def test_a_full_disk_is_one_line_and_leaves_nothing(
    hf_in, tmp_path, monkeypatch, capsys, saver, owner, attribute, fault
):
    if isinstance(fault, OSError):
        error = fault

        def fault(*args, **kwargs):
            raise error

    out = tmp_path / "out"
    monkeypatch.setattr(owner, attribute, fault)
    argv = ["convert", "--loader", "hf", "--saver", saver, "--load-dir", str(hf_in), "--save-dir", str(out)]
    err = _one_line_error(argv, capsys)
    assert f"--save-dir {out}: no space left on the device" in err and "free some space" in err
    assert _listing(tmp_path) == []


def test_a_full_disk_keeps_the_previous_output(hf_in, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert cli_main(_convert(hf_in, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(hf, "save_file", _full_disk_in_safetensors)
    assert "no space left" in _one_line_error(_convert(hf_in, out, "--overwrite"), capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _listing(tmp_path) == ["out"]


def _read_only_below(monkeypatch, folder: Path, code: int) -> None:
    """Creating anything inside `folder` fails as on a read-only mount (root ignores mode bits)."""
    mkdir, open_ = os.mkdir, os.open

    def refuse(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise OSError(code, os.strerror(code), str(path))

    def refusing_mkdir(path, *args, **kwargs):
        refuse(path)
        return mkdir(path, *args, **kwargs)

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            refuse(path)
        return open_(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refusing_mkdir)
    monkeypatch.setattr(os, "open", refusing_open)


@pytest.mark.parametrize(
    ("code", "reason"), [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission")]
)
def test_a_read_only_output_folder_is_one_line(hf_in, tmp_path, monkeypatch, capsys, code, reason):
    _read_only_below(monkeypatch, tmp_path, code)
    err = _one_line_error(_convert(hf_in, tmp_path / "out"), capsys)
    assert f"--save-dir {tmp_path / 'out'}: cannot write" in err and reason in err
    assert "in a folder you can write to" in err


# ---------------------------------------------------------------------------- truncated inputs


@pytest.mark.parametrize("keep", [0, 0.5], ids=["empty", "truncated"])
def test_a_truncated_safetensors_file_is_named(hf_in, tmp_path, capsys, keep):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in HF_FILES:
        data = (hf_in / name).read_bytes()
        (broken / name).write_bytes(data[: int(len(data) * keep)] if name == "model.safetensors" else data)
    err = _one_line_error(_convert(broken, tmp_path / "out"), capsys)
    assert f"{broken / 'model.safetensors'}: not a readable safetensors file" in err
    assert "truncated or empty" in err and "fetch or copy it again" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- evaluate --output


@pytest.fixture(scope="module")
def mmlu_args(hf_in, tmp_path_factory, tokenizer_path) -> list[str]:
    tiny = Mistral(MistralConfig.from_name("tiny")).save_pretrained(tmp_path_factory.mktemp("tiny") / "hf")
    data = write_mmlu(tmp_path_factory.mktemp("mmlu"))
    argv = ["--data-dir", str(data), "--checkpoint", str(tiny), "--tokenizer-model", tokenizer_path]
    return [*argv, "--subjects", "astronomy", "--shots", "1"]


def _scoring_must_not_start(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the output should have been refused before loading and scoring")

    monkeypatch.setattr(
        "mistral_lightning.generation.loading.load_model", fail
    )  # evaluate imports it in main


def test_evaluate_refuses_an_output_it_cannot_write_before_scoring(mmlu_args, tmp_path, monkeypatch, capsys):
    _scoring_must_not_start(monkeypatch)
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    err = _one_line_error(["evaluate", *mmlu_args, "--output", str(mine)], capsys)
    assert f"--output {mine}: exists" in err and "--overwrite" in err
    err = _one_line_error(["evaluate", *mmlu_args, "--output", str(mine), "--overwrite"], capsys)
    assert "is not a previous MMLU report written by evaluate" in err
    assert mine.read_text() == '{"my": "notes"}'
    _read_only_below(monkeypatch, tmp_path / "ro", errno.EROFS)
    err = _one_line_error(["evaluate", *mmlu_args, "--output", str(tmp_path / "ro" / "r.json")], capsys)
    assert "read-only file system" in err


def test_evaluate_on_a_full_disk_leaves_no_empty_report(mmlu_args, tmp_path, monkeypatch, capsys):
    output = tmp_path / "report.json"
    assert cli_main(["evaluate", *mmlu_args, "--output", str(output)]) == 0
    previous = output.read_text()
    assert json.loads(previous)["num_questions"] == 4

    fsync = os.fsync

    def full_disk(fd):
        if f"/report.json.tmp-{os.getpid()}-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    capsys.readouterr()
    assert cli_main(["evaluate", *mmlu_args, "--output", str(output), "--overwrite"]) == 2
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and printed.err.count("\n") == 1, printed.err
    assert f"--output {output}: no space left on the device" in printed.err
    assert "all (micro-average)" in printed.out  # the results were shown before the write failed
    assert output.read_text() == previous and _listing(tmp_path) == ["report.json"]
    monkeypatch.setattr(os, "fsync", fsync)
    assert cli_main(["evaluate", *mmlu_args, "--output", str(output), "--overwrite"]) == 0


# ---------------------------------------------------------------------------- predict's JSONL


def test_predict_writer_refuses_a_foreign_file_before_generating(tmp_path, tokenizer_path):
    import lightning as L

    from mistral_lightning.errors import UserError
    from mistral_lightning.generation.predict_data import PromptsDataModule
    from mistral_lightning.generation.predict_writer import JsonlPredictionWriter

    class Predictor(L.LightningModule):
        calls = 0

        def predict_step(self, batch, batch_idx):
            Predictor.calls += 1
            return [[1, 2]] * len(batch["prompt"])

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    data = PromptsDataModule(str(prompts), tokenizer_path, batch_size=1)
    output = tmp_path / "completions.jsonl"
    output.write_text("my own notes\n")

    def predict(overwrite: bool) -> None:
        writer = JsonlPredictionWriter(str(output), overwrite=overwrite)
        trainer = L.Trainer(accelerator="cpu", callbacks=[writer], logger=False, enable_progress_bar=False)
        trainer.predict(Predictor(), datamodule=data, return_predictions=False)

    for overwrite, message in (
        (False, "exists; choose another file"),
        (True, "is not a previous predictions"),
    ):
        with pytest.raises(UserError, match=message):
            predict(overwrite)
    assert output.read_text() == "my own notes\n" and Predictor.calls == 0
    output.unlink()
    predict(False)
    predict(True)  # replaces its own previous predictions
    assert Predictor.calls == 2
    assert [json.loads(line)["prompt"] for line in output.read_text().splitlines()] == ["Hello"]


# ---------------------------------------------------------------------------- preprocess


@pytest.mark.processes
def test_preprocess_replaces_only_its_own_datasets(tmp_path, tokenizer_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "hello world"}\n{"text": "a second document"}\n')
    argv = ["preprocess", "--input", str(data), "--tokenizer-model", tokenizer_path]
    argv += ["--output-prefix", str(tmp_path / "out" / "corpus")]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / "out").mkdir()
    leftover = tmp_path / "out" / f"corpus_text_document.bin.tmp-{int(dead.stdout)}"
    leftover.write_bytes(b"half")
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0  # a rerun replaces the dataset it wrote
    assert _listing(tmp_path / "out") == ["corpus_text_document.bin", "corpus_text_document.idx"]

    (tmp_path / "out" / "corpus_text_document.idx").write_text("my index")
    err = _one_line_error(argv, capsys)
    assert "corpus_text_document.bin exists and is not part of an indexed dataset" in err
    assert (tmp_path / "out" / "corpus_text_document.idx").read_text() == "my index"
