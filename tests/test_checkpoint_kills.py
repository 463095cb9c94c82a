"""kill -9 at any file operation of a checkpoint save leaves a resume that is bit-exact with the
uninterrupted run from the newest complete checkpoint.

A reference `fit` (checkpoints at steps 2, 4 and 6, each as step=N.ckpt then last.ckpt) records every file
operation of its saves. For each operation of the two saves at step 4, a fresh run is killed right there
(os._exit in a forked child: no cleanup, no flush), then `fit --ckpt_path last` resumes it. The state of
step 4 exists from the moment its save's completion mark is in place (os.replace of complete.json, the
file operation that vouches for the rest); before that the newest complete checkpoint holds step 2. The
resumed run must log the reference's losses from that step on and end with the reference's weights and
optimizer state, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import MAX_STEPS, SMALL_VOCAB, dcp_tensors, fit_config, logged_losses
from helpers.processes import without_process_group

pytestmark = [pytest.mark.processes, pytest.mark.slow]

WORKER = Path(__file__).parent / "helpers" / "checkpoint_kill_worker.py"
KILLED = 17


def _worker(runs: list[dict], folder: Path) -> list[int]:
    spec, results = folder / "spec.json", folder / "results.json"
    spec.write_text(json.dumps({"runs": runs, "results": str(results)}))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(spec)],
        env={**without_process_group(os.environ), "OMP_NUM_THREADS": "1"},
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert results.is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(results.read_text()), proc.stderr


def _save_operations(events: Path) -> tuple[list[str], list[tuple[int, str, int]]]:
    """The checkpoints saved, in order, and (index, operation, which save) for each file operation."""
    saves, operations = [], []
    for line in events.read_text().splitlines():
        first, rest = line.split(" ", 1)
        if first == "-":
            saves.append(Path(rest.removeprefix("save ")).name)
        else:
            operations.append((int(first), rest, len(saves) - 1))
    return saves, operations


def test_a_kill_at_any_file_operation_of_a_save_resumes_bit_exact(toy_data, tmp_path):
    reference = tmp_path / "reference"
    events = tmp_path / "events.txt"
    argv = ["fit", "--config", str(fit_config(reference, toy_data, model_config=SMALL_VOCAB))]
    codes, err = _worker([{"argv": argv, "events": str(events)}], tmp_path)
    assert codes == [0], err

    saves, operations = _save_operations(events)
    assert saves == ["step=2.ckpt", "last.ckpt", "step=4.ckpt", "last.ckpt", "step=6.ckpt", "last.ckpt"]
    # The operations of the two saves at step 4 (saves 2 and 3) are the kill points.
    at_step_4 = [(index, operation) for index, operation, save in operations if save in (2, 3)]
    # Step 4 is there once its save's completion mark is in place (without a mark: once the save is over).
    marks = [
        index
        for index, operation, save in operations
        if save == 2 and operation.startswith("os.replace") and operation.endswith("complete.json")
    ]
    step_4_complete = marks[0] if marks else max(index for index, _, save in operations if save == 2)

    runs = []
    for index, _ in at_step_4:
        config = str(fit_config(tmp_path / f"kill-{index}", toy_data, model_config=SMALL_VOCAB))
        runs.append({"argv": ["fit", "--config", config], "kill_at": index})
        resume = [
            "fit",
            "--config",
            config,
            "--ckpt_path",
            "last",
            "--trainer.logger.init_args.version",
            "resumed",
        ]
        runs.append({"argv": resume})
    codes, err = _worker(runs, tmp_path)
    assert codes == [KILLED, 0] * len(at_step_4), err

    reference_losses = logged_losses(reference)
    assert sorted(reference_losses) == list(range(MAX_STEPS))
    reference_state = dcp_tensors(reference / "checkpoints" / "last.ckpt")
    for index, operation in at_step_4:
        root = tmp_path / f"kill-{index}"
        start = 4 if index > step_4_complete else 2
        resumed = logged_losses(root, "resumed")
        expected = {step: reference_losses[step] for step in range(start, MAX_STEPS)}
        assert resumed == expected, f"killed at {index} ({operation}): resumed from step {min(resumed)}"
        state = dcp_tensors(root / "checkpoints" / "last.ckpt")
        assert state.keys() == reference_state.keys()
        unequal = [key for key in state if not torch.equal(state[key], reference_state[key])]
        assert not unequal, f"killed at {index} ({operation}): {unequal[:3]} differ"
        # What the crash left beside the checkpoints is gone once the resumed run has saved again.
        assert not [entry.name for entry in (root / "checkpoints").iterdir() if entry.name.startswith(".")]
