"""No checkpoint runs code unless the user says it may.

A payload that would create a file when unpickled is planted in each pickle a checkpoint holds: DCP's
`.metadata`, a non-tensor entry of the DCP data files, Lightning's `meta.pt`, a Megatron `.pt` file. Every
command that reads the checkpoint (export, convert, generate, fit and validate --ckpt_path) refuses it
in one line naming the file and `--trust-checkpoint`, and the file the payload would create never appears.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
from pathlib import Path

import pytest
import torch
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
