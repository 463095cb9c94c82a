"""No checkpoint runs code unless the user says it may.

A payload that would create a file when unpickled is planted in each pickle a checkpoint holds: DCP's
`.metadata`, a non-tensor entry of the DCP data files, Lightning's `meta.pt`, a Megatron `.pt` file. Every
command that reads the checkpoint (export, convert, generate, fit and validate --ckpt_path) refuses it
in one line naming the file and `--trust-checkpoint`, and the file the payload would create never appears;
so does `fit --ckpt_path` when the payload is planted the moment the checks have passed (a full and a LoRA
run's checkpoint). A `.metadata` that sets an attribute on an allowed class, and file names in `.metadata`
or complete.json that lead out of the checkpoint folder, are refused too.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import pickle
import shutil
from pathlib import Path, PosixPath

import pytest
import torch
import yaml
from helpers.checkpoints import (
    CreatesFile,
    fit_config,
    one_line_error,
    plant_in_dcp_entry,
    plant_in_dcp_metadata,
    plant_in_meta_pt,
)

from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint
from mistral_lightning.cli import main as cli_main
from mistral_lightning.training import strategy


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory) -> Path:
    """A complete DCP checkpoint after 2 steps, as `mistral-lightning fit` writes it."""
    root = tmp_path_factory.mktemp("trained")
    assert cli_main(["fit", "--config", str(fit_config(root, toy_data)), "--trainer.max_steps", "2"]) == 0
    return root / "checkpoints" / "step=2.ckpt"


def _copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "step=2.ckpt"))


def _command(name: str, checkpoint: Path, tmp_path: Path, toy_data: str, tokenizer_path: str) -> list[str]:
    out = str(tmp_path / "out")
    return {
        "export": ["export", "--checkpoint", str(checkpoint), "--out", out],
        "convert": ["convert", "--loader", "lightning", "--saver", "hf"]
        + ["--load-dir", str(checkpoint), "--save-dir", out],
        "generate": [
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "2",
        ]
        + ["--tokenizer-model", tokenizer_path, "--device", "cpu"],
        "fit": ["fit", "--config", str(fit_config(tmp_path / "run", toy_data))]
        + ["--ckpt_path", str(checkpoint), "--trainer.max_steps", "3"],
        "validate": ["validate", "--config", str(fit_config(tmp_path / "run", toy_data))]
        + ["--ckpt_path", str(checkpoint)],
    }[name]


PLANTS = {
    ".metadata": plant_in_dcp_metadata,
    "meta.pt": plant_in_meta_pt,
    "optimizer_0.param_groups.0.lr": plant_in_dcp_entry,
}


@pytest.mark.parametrize("command", ["export", "convert", "generate", "fit", "validate"])
@pytest.mark.parametrize("where", list(PLANTS))
def test_a_payload_in_a_training_checkpoint_never_runs(
    trained, toy_data, tokenizer_path, tmp_path, capsys, command, where
):
    checkpoint = _copy(trained, tmp_path)
    ran = tmp_path / "payload-ran"
    PLANTS[where](checkpoint, CreatesFile(ran))
    error = one_line_error(capsys, _command(command, checkpoint, tmp_path, toy_data, tokenizer_path))
    assert not ran.exists()
    assert where in error and "--trust-checkpoint" in error
    assert not (tmp_path / "out").exists()


def test_a_payload_in_a_megatron_file_never_runs(tmp_path, capsys):
    ran = tmp_path / "payload-ran"
    folder = tmp_path / "megatron"
    rank_file = folder / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    rank_file.parent.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("1\n")
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    torch.save({"args": args, "iteration": 1, "model": {}, "payload": CreatesFile(ran)}, rank_file)
    argv = ["convert", "--loader", "megatron", "--saver", "hf", "--load-dir", str(folder)]
    error = one_line_error(capsys, [*argv, "--save-dir", str(tmp_path / "out")])
    assert not ran.exists()
    assert "model_optim_rng.pt" in error and "--trust-checkpoint" in error


def test_trust_checkpoint_loads_what_the_allow_list_refuses(
    trained, toy_data, tokenizer_path, tmp_path, capsys
):
    """A harmless object outside the allow-list (a date) is refused, and loads with --trust-checkpoint."""
    checkpoint = _copy(trained, tmp_path)
    plant_in_dcp_metadata(checkpoint, datetime.date(2024, 1, 1))
    for command in ("export", "generate", "fit"):
        argv = _command(command, checkpoint, tmp_path / command, toy_data, tokenizer_path)
        assert "datetime.date" in one_line_error(capsys, argv)
        assert cli_main([*argv, "--trust-checkpoint"]) == 0, command
    expected = LightningCheckpoint(trained)
    exported = LightningCheckpoint(checkpoint, trust_pickle=True)
    assert torch.equal(exported.read("embed.weight"), expected.read("embed.weight"))


# ---------------------------------------------------------------------- a file swapped after the checks
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]}


def _lora_fit_config(root: Path, toy_data: str) -> Path:
    config = fit_config(root, toy_data)
    settings = yaml.safe_load(config.read_text())
    settings["model"]["lora"] = LORA
    config.write_text(yaml.safe_dump(settings))
    return config


@pytest.fixture(scope="module")
def trained_lora(toy_data, tmp_path_factory) -> Path:
    """A LoRA run's checkpoint after 2 steps: the adapters and their optimizer state only."""
    root = tmp_path_factory.mktemp("trained_lora")
    config = _lora_fit_config(root, toy_data)
    assert cli_main(["fit", "--config", str(config), "--trainer.max_steps", "2"]) == 0
    return root / "checkpoints" / "step=2.ckpt"


@pytest.mark.parametrize("run", ["full", "lora"])
@pytest.mark.parametrize("where", [".metadata", "optimizer_0.param_groups.0.lr"])
def test_a_checkpoint_swapped_after_its_checks_still_runs_no_payload(
    request, toy_data, tmp_path, capsys, monkeypatch, run, where
):
    """Shared storage another user can write to: the checks pass on the real files, which are replaced by
    poisoned ones the moment they return, before the weights load. The load reads through the checks too."""
    checkpoint = _copy(request.getfixturevalue("trained" if run == "full" else "trained_lora"), tmp_path)
    ran = tmp_path / "payload-ran"
    checked = strategy.checkpoint_to_load

    def check_then_swap(*args, **kwargs):
        result = checked(*args, **kwargs)
        PLANTS[where](checkpoint, CreatesFile(ran))
        return result

    monkeypatch.setattr(strategy, "checkpoint_to_load", check_then_swap)
    root = tmp_path / "run"
    config = fit_config(root, toy_data) if run == "full" else _lora_fit_config(root, toy_data)
    argv = ["fit", "--config", str(config), "--ckpt_path", str(checkpoint), "--trainer.max_steps", "3"]
    error = one_line_error(capsys, argv)
    assert not ran.exists()
    assert where in error and "--trust-checkpoint" in error


def test_a_metadata_that_sets_attributes_on_a_class_is_refused(trained, tmp_path, capsys, monkeypatch):
    """The allow-list builds DCP's classes; a BUILD instruction aimed at an allowed class itself (pathlib's
    PosixPath.exists replaced for the rest of the process) is refused before it runs."""
    monkeypatch.setattr(PosixPath, "exists", PosixPath.exists)  # put back after the test, whatever happens
    checkpoint = _copy(trained, tmp_path)
    with (checkpoint / ".metadata").open("rb") as stream:
        metadata = pickle.dumps(pickle.load(stream), protocol=2)
    # GLOBAL pathlib.PosixPath; the state (None, {"exists": OrderedDict}); BUILD; POP; then the real metadata.
    state = pickle.dumps((None, {"exists": collections.OrderedDict}), protocol=2)[2:-1]
    crafted = metadata[:2] + b"cpathlib\nPosixPath\n" + state + pickle.BUILD + pickle.POP + metadata[2:]
    (checkpoint / ".metadata").write_bytes(crafted)
    marker = json.loads((checkpoint / "complete.json").read_text())
    marker["files"][".metadata"] = len(crafted)
    (checkpoint / "complete.json").write_text(json.dumps(marker))
    error = one_line_error(
        capsys, ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    )
    assert PosixPath.exists is not collections.OrderedDict and tmp_path.exists()
    assert ".metadata" in error and "pathlib.PosixPath" in error and "--trust-checkpoint" in error


@pytest.mark.parametrize("recorded_in", [".metadata", "complete.json"])
def test_file_names_leading_out_of_the_checkpoint_are_refused(trained, tmp_path, capsys, recorded_in):
    """A copy of the data file beside the checkpoint, named `../outside.distcp` by `.metadata` or listed by
    complete.json: the checkpoint would load, from a file that is not its own."""
    checkpoint = _copy(trained, tmp_path)
    (data_file,) = checkpoint.glob("*.distcp")
    shutil.copy(data_file, tmp_path / "outside.distcp")
    marker = json.loads((checkpoint / "complete.json").read_text())
    if recorded_in == ".metadata":
        with (checkpoint / ".metadata").open("rb") as stream:
            metadata = pickle.load(stream)
        for info in metadata.storage_data.values():
            info.relative_path = "../outside.distcp"
        (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
        data_file.unlink()
        del marker["files"][data_file.name]
        marker["files"][".metadata"] = (checkpoint / ".metadata").stat().st_size
    else:
        marker["files"]["../outside.distcp"] = data_file.stat().st_size
    (checkpoint / "complete.json").write_text(json.dumps(marker))
    error = one_line_error(
        capsys, ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    )
    assert recorded_in in error and "'../outside.distcp'" in error and "not inside" in error
    assert not (tmp_path / "out").exists()
