"""No writer follows a link planted in a shared folder, and `~` in a path option is the home folder (issue 25).

A hostile user who can write to the output's folder plants symlinks to a victim file: at the temporary
name a writer uses (`<name>.tmp-<pid>`, predictable before; with the random part forced, as an attacker
who guessed it) and at the output itself. Every writer must leave the victim as it was: it creates its
temporary with O_CREAT|O_EXCL|O_NOFOLLOW (outputs.NewFile) and renames it, and refuses a link as its output.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import tiny_fit_config, write_config
from helpers.mmlu import write_mmlu

from mistral_lightning import Mistral, MistralConfig, outputs
from mistral_lightning.cli import main as cli_main
from mistral_lightning.cli.configs import copy_configs, packaged_configs, packaged_configs_dir
from mistral_lightning.data.datasets import cached_arrays
from mistral_lightning.data.indexed import IndexedDatasetWriter
from mistral_lightning.demo.data import write_demo_data
from mistral_lightning.errors import UserError
from mistral_lightning.outputs import FileKind, NewFile, OutputTarget, write_output_file

VICTIM = "the victim's own bytes\n"
FORCED = "0" * 16  # the random part of every temporary name, as an attacker who guessed it


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_text(VICTIM)
    return path


def _plant(folder: Path, name: str, victim: Path) -> None:
    """Links to `victim` at the temporary names of a write of `folder/name`: the one writers used before
    (`<name>.tmp-<pid>`) and today's, with its random part forced."""
    folder.mkdir(parents=True, exist_ok=True)
    links = [folder / f"{name}.tmp-{os.getpid()}", folder / f"{name}.tmp-{os.getpid()}-{FORCED}"]
    for link in links:
        link.symlink_to(victim)


@pytest.fixture(scope="module")
def mmlu_args(tmp_path_factory, tokenizer_path) -> list[str]:
    tiny = Mistral(MistralConfig.from_name("tiny")).save_pretrained(tmp_path_factory.mktemp("tiny") / "hf")
    data = write_mmlu(tmp_path_factory.mktemp("mmlu"))
    argv = ["--data-dir", str(data), "--checkpoint", str(tiny), "--tokenizer-model", tokenizer_path]
    return [*argv, "--subjects", "astronomy", "--shots", "1"]


def test_evaluate_output_in_a_shared_folder_leaves_a_planted_links_target_alone(
    mmlu_args, tmp_path, victim, capsys
):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f"report.json.tmp-{os.getpid()}").symlink_to(victim)  # the name evaluate used to write through
    assert cli_main(["evaluate", *mmlu_args, "--output", str(shared / "report.json")]) == 0
    assert victim.read_text() == VICTIM
    assert json.loads((shared / "report.json").read_text())["num_questions"] == 4
    assert not (shared / "report.json").is_symlink()
    # A link planted at the output itself is refused, not written through, even with --overwrite.
    (shared / "other.json").symlink_to(victim)
    capsys.readouterr()
    assert cli_main(["evaluate", *mmlu_args, "--output", str(shared / "other.json"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a plain file" in err and len(err.strip().splitlines()) == 1, err
    assert victim.read_text() == VICTIM


def _indexed(prefix: Path) -> None:
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
        writer.finalize()


def _first_config() -> str:
    return next(iter(packaged_configs().values())).relative_to(packaged_configs_dir()).as_posix()


# Each file writer, and the first file it writes under its folder.
WRITERS = {
    "report": (
        lambda folder: write_output_file(OutputTarget(folder / "r.json"), FileKind("report", bool), "{}"),
        lambda: "r.json",
    ),
    "indexed .bin/.idx": (lambda folder: _indexed(folder / "corpus"), lambda: "corpus.bin"),
    "index cache": (
        lambda folder: cached_arrays(folder, "cache", ("sizes",), lambda: {"sizes": np.ones(3)}),
        lambda: hashlib.sha256(b"cache").hexdigest()[:20] + ".txt",
    ),
    "demo-data": (
        lambda folder: write_demo_data(folder, train_rows=5, heldout_rows=5, mmlu_test_per_subject=1),
        lambda: "alpaca/train.parquet",
    ),
    "configs --out": (copy_configs, _first_config),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_no_writer_follows_a_link_planted_at_its_temporary_name(writer, tmp_path, victim, monkeypatch):
    write, first_file = WRITERS[writer]
    folder = tmp_path / "shared"
    target = folder / first_file()
    _plant(target.parent, target.name, victim)
    monkeypatch.setattr(outputs.secrets, "token_hex", lambda nbytes=None: FORCED)
    with pytest.raises((OSError, UserError)):
        write(folder)  # the guessed name is taken: the writer stops instead of following the link
    assert victim.read_text() == VICTIM
    assert not target.is_symlink()


def test_a_new_file_is_created_new_with_the_users_umask(tmp_path, victim):
    link = tmp_path / "out.txt.tmp-1-ab"
    link.symlink_to(victim)
    previous = os.umask(0o027)
    try:
        with NewFile(tmp_path / "out.txt", "w") as stream:
            stream.write("new")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.txt").read_text() == "new" and (
        tmp_path / "out.txt"
    ).stat().st_mode & 0o777 == 0o640
    assert victim.read_text() == VICTIM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out.txt", "out.txt.tmp-1-ab"]


def test_plan_output_goes_through_the_output_rules(tmp_path, toy_data, victim, capsys):
    config = write_config(tiny_fit_config(tmp_path, toy_data), tmp_path / "fit.yaml")
    link = tmp_path / "plan.json"
    link.symlink_to(victim)
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}\n')
    for output, overwrite, message in (
        (link, "true", "exists and is not a plain file"),
        (mine, "false", "exists; choose another file, or pass --plan_overwrite true"),
        (mine, "true", "is not a previous memory plan written by plan"),
    ):
        capsys.readouterr()
        argv = ["plan", "--config", str(config), "--plan_output", str(output), "--plan_overwrite", overwrite]
        assert cli_main(argv) == 2  # refused before the simulation
        err = capsys.readouterr().err
        assert f"--plan_output {output}: {message}" in err and len(err.strip().splitlines()) == 1, err
    assert victim.read_text() == VICTIM and mine.read_text() == '{"my": "notes"}\n'
    # A plan is written by write_output_file, past links at its temporary names: the "report" writer above.


@pytest.mark.parametrize("command", ["configs --out", "convert --load-dir/--save-dir"])
def test_a_tilde_in_a_path_option_is_the_home_folder(command, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    if command == "configs --out":
        assert cli_main(["configs", "--out", "~/copied"]) == 0
        assert (home / "copied" / "tiny" / "finetune.yaml").is_file()
    else:
        Mistral(MistralConfig.from_name("tiny", vocab_size=64)).save_pretrained(home / "hf_in")
        argv = [
            "convert",
            "--loader",
            "hf",
            "--saver",
            "hf",
            "--load-dir",
            "~/hf_in",
            "--save-dir",
            "~/hf_out",
        ]
        assert cli_main(argv) == 0
        assert (home / "hf_out" / "model.safetensors").is_file()
    assert not (tmp_path / "~").exists()
