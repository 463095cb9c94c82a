"""A checkpoint is good or absent: no NaN/Inf state is written, a full disk leaves nothing half-written
under a checkpoint's name, an incomplete checkpoint is never loaded, and each stop is one line.

Checked against torch's own readers (DCP, torch.load), not ours; runs go through `mistral-lightning fit`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import (
    dcp_tensors,
    fill_disk_while_writing,
    fit_config,
    logged_losses,
    one_line_error,
)

from mistral_lightning.cli import main as cli_main


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint / "meta.pt", weights_only=True)["global_step"]


def _hidden(folder: Path) -> list[str]:
    return [entry.name for entry in folder.iterdir() if entry.name.startswith(".")]


# ---------------------------------------------------------------------- NaN/Inf
def test_a_diverging_run_stops_in_one_line_and_leaves_only_finite_checkpoints(toy_data, tmp_path, capsys):
    """lr 1e30: after step 2 the weights are NaN although that step's loss was finite (the clipped update
    is what overflows), so the save at step 2 is refused; the step-1 checkpoints stay the last good ones."""
    config = fit_config(tmp_path, toy_data, lr=1e30, every=1)
    error = one_line_error(capsys, ["fit", "--config", str(config)])
    checkpoints = tmp_path / "checkpoints"
    assert "step 2" in error and "NaN or Inf" in error
    assert "lower model.optimizer.lr" in error and "trainer.gradient_clip_val" in error
    assert f"the last good checkpoint is {checkpoints / 'last.ckpt'} (step 1)" in error
    assert sorted(entry.name for entry in checkpoints.iterdir()) == ["last.ckpt", "step=1.ckpt"]
    for checkpoint in checkpoints.iterdir():
        assert _step(checkpoint) == 1
        state = dcp_tensors(checkpoint)  # weights and optimizer state
        assert all(torch.isfinite(tensor).all() for tensor in state.values()), checkpoint


def test_a_nan_loss_stop_names_the_last_good_checkpoint(toy_data, tmp_path, capsys):
    """Checkpoints every 3 steps: the NaN weights of step 2 meet no save; step 3's loss is NaN."""
    config = fit_config(tmp_path, toy_data, lr=1e30, every=3)
    error = one_line_error(capsys, ["fit", "--config", str(config)])
    assert "training loss is nan" in error
    assert f"no complete checkpoint is in {tmp_path / 'checkpoints'} yet" in error


# ---------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("where", ["data", "meta.pt"])
def test_a_full_disk_stops_in_one_line_and_leaves_nothing_half_written(
    toy_data, tmp_path, capsys, monkeypatch, where
):
    fill_disk_while_writing(where, "step=4.ckpt", monkeypatch.setattr)
    error = one_line_error(capsys, ["fit", "--config", str(fit_config(tmp_path, toy_data))])
    checkpoints = tmp_path / "checkpoints"
    assert str(checkpoints) in error and "no space left on the device" in error and "GB free there" in error
    assert f"the last good checkpoint is {checkpoints / 'last.ckpt'} (step 2)" in error
    assert sorted(entry.name for entry in checkpoints.iterdir()) == ["last.ckpt", "step=2.ckpt"]
    assert _step(checkpoints / "last.ckpt") == 2
    dcp_tensors(checkpoints / "last.ckpt")  # still whole: torch's reader loads every tensor


# ---------------------------------------------------------------------- incomplete checkpoints
@pytest.fixture(scope="module")
def finished(toy_data, tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoints at steps 2, 4, 6 and its logged losses."""
    root = tmp_path_factory.mktemp("finished")
    assert cli_main(["fit", "--config", str(fit_config(root, toy_data))]) == 0
    return root


def _as_written_in_place(checkpoint: Path) -> None:
    """What Lightning's own strategy leaves when killed while rewriting `checkpoint` in place: the data file
    cut short under the previous .metadata and meta.pt (and no completion mark, which it never writes)."""
    (checkpoint / "complete.json").unlink(missing_ok=True)
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    meta.pop("checkpoint_save_id", None)
    torch.save(meta, checkpoint / "meta.pt")
    data = checkpoint / "__0_0.distcp"
    with data.open("r+b") as stream:
        stream.truncate(data.stat().st_size // 3)


def test_resuming_from_an_incomplete_last_uses_the_newest_complete_checkpoint(
    finished, toy_data, tmp_path, caplog, single_thread
):
    root = tmp_path / "run"
    shutil.copytree(finished / "checkpoints", root / "checkpoints")
    config = fit_config(root, toy_data)
    _as_written_in_place(root / "checkpoints" / "last.ckpt")
    shutil.rmtree(root / "checkpoints" / "step=6.ckpt")  # the run was killed while saving step 6
    with caplog.at_level(logging.INFO):  # the note goes through Lightning's rank-zero logger
        assert cli_main(["fit", "--config", str(config), "--ckpt_path", "last"]) == 0
    notes = [
        record.getMessage()
        for record in caplog.records
        if "--ckpt_path last: resuming" in record.getMessage()
    ]
    assert len(notes) == 1 and "step=4.ckpt (step 4)" in notes[0] and "last.ckpt" in notes[0]
    reference = logged_losses(finished)
    assert logged_losses(root) == {step: reference[step] for step in (4, 5)}


def test_an_incomplete_checkpoint_is_refused_naming_the_newest_complete_one(
    finished, toy_data, tmp_path, capsys
):
    checkpoints = Path(shutil.copytree(finished / "checkpoints", tmp_path / "checkpoints"))
    (checkpoints / "step=6.ckpt" / "meta.pt").unlink()
    config = fit_config(tmp_path / "run", toy_data)
    refused = checkpoints / "step=6.ckpt"
    error = one_line_error(capsys, ["fit", "--config", str(config), "--ckpt_path", str(refused)])
    assert f"{refused / 'meta.pt'}: missing" in error
    assert f"the newest complete checkpoint there is {checkpoints / 'last.ckpt'} (step 6)" in error
    error = one_line_error(capsys, ["export", "--checkpoint", str(refused), "--out", str(tmp_path / "hf")])
    assert f"{refused / 'meta.pt'}: missing" in error
    assert not (tmp_path / "hf").exists()
