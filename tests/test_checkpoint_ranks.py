"""The checks hold across ranks (2 gloo processes, TP=2): a checkpoint holds every rank's files and
resumes bit-exact; a full disk on one rank stops every rank with one line, and no rank waits forever."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.checkpoints import dcp_tensors, fit_config, launch_fit_ranks, logged_losses

pytestmark = [pytest.mark.processes, pytest.mark.slow]


def test_a_tensor_parallel_checkpoint_is_complete_and_resumes_bit_exact(toy_data, tmp_path):
    straight = tmp_path / "straight"
    results = launch_fit_ranks(["fit", "--config", str(fit_config(straight, toy_data))], tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    record = (straight / "checkpoints" / "step=4.ckpt" / "complete.json").read_text()
    assert "__0_0.distcp" in record and "__1_0.distcp" in record  # both ranks' shards are vouched for

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step=4.ckpt", resumed / "checkpoints" / "step=4.ckpt")
    argv = ["fit", "--config", str(fit_config(resumed, toy_data)), "--ckpt_path", "last"]
    results = launch_fit_ranks(argv, tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    reference = logged_losses(straight)
    assert logged_losses(resumed) == {step: reference[step] for step in (4, 5)}
    expected, state = (dcp_tensors(root / "checkpoints" / "last.ckpt") for root in (straight, resumed))
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)


def test_a_full_disk_on_one_rank_stops_every_rank_in_one_line(toy_data, tmp_path):
    for fault, failing_rank in (("1:data:step=4.ckpt", 1), ("0:meta.pt:step=4.ckpt", 0)):
        root = tmp_path / f"rank{failing_rank}"
        results = launch_fit_ranks(["fit", "--config", str(fit_config(root, toy_data))], tmp_path, fault)
        assert [code for code, _ in results] == [2, 2], results
        lines = [
            [line for line in err.splitlines() if line.startswith("mistral-lightning ")] for _, err in results
        ]
        assert all(
            len(rank_lines) == 1 and "Traceback" not in err for rank_lines, (_, err) in zip(lines, results)
        )
        assert "no space left on the device" in lines[failing_rank][0], lines
        checkpoints = root / "checkpoints"
        assert sorted(entry.name for entry in checkpoints.iterdir()) == ["last.ckpt", "step=2.ckpt"]
