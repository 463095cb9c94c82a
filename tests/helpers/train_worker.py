"""One rank of a test launch: runs the scenarios of a spec file in turn; rank 0 writes what they recorded.

A scenario: {"name", "data", "tensor_parallel", "data_parallel", "module": {...}, "resume": ckpt or null,
"checkpoint_every": n or null, "kill_at_step": n or null, "seq_length": n, "expect_error": bool,
"instruction": bool (data is instruction data), "global_batch": n, "accumulate": n, "context_parallel": n,
"max_steps": n}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for `helpers`
from helpers.training import (  # noqa: E402
    GLOBAL_BATCH,
    SEQ_LENGTH,
    STEPS,
    Recorder,
    StepCounter,
    datamodule,
    module,
    trainer,
)


class KillAtStep(L.Callback):
    """Ends the process abruptly when step `step` starts, as a crash or a preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os._exit(17)


class AllReduceCounter(L.Callback):
    """How many `torch.distributed.all_reduce` calls the training batches make (hooks between batches excluded)."""

    def __init__(self) -> None:
        self.calls = 0
        self._in_batch = False
        self._original = torch.distributed.all_reduce

    def _counting(self, *args, **kwargs):
        self.calls += self._in_batch
        return self._original(*args, **kwargs)

    def on_train_start(self, *args) -> None:
        torch.distributed.all_reduce = self._counting

    def on_train_batch_start(self, *args) -> None:
        self._in_batch = True

    def on_train_batch_end(self, *args) -> None:
        self._in_batch = False

    def on_train_end(self, *args) -> None:
        torch.distributed.all_reduce = self._original

    def on_exception(self, *args) -> None:
        torch.distributed.all_reduce = self._original


def run(scenario: dict, root: Path) -> dict:
    recorder, counter, all_reduces = Recorder(), StepCounter(), AllReduceCounter()
    callbacks = [recorder, counter, all_reduces]
    if scenario.get("kill_at_step"):
        callbacks.append(KillAtStep(scenario["kill_at_step"]))
    accumulate = scenario.get("accumulate", 1)
    fit_trainer = trainer(
        root / scenario["name"],
        tensor_parallel=scenario.get("tensor_parallel", 1),
        data_parallel=scenario.get("data_parallel", 1),
        context_parallel=scenario.get("context_parallel", 1),
        max_steps=scenario.get("max_steps", STEPS),
        accumulate=accumulate,
        callbacks=callbacks,
        checkpoint_every=scenario.get("checkpoint_every"),
    )
    data = datamodule(
        scenario["data"],
        scenario.get("data_parallel", 1),
        scenario.get("seq_length", SEQ_LENGTH),
        global_batch=scenario.get("global_batch", GLOBAL_BATCH),
        accumulate=accumulate,
        instruction=scenario.get("instruction", False),
        preference=scenario.get("preference", False),
    )
    try:
        fit_trainer.fit(
            module(**scenario.get("module", {})), datamodule=data, ckpt_path=scenario.get("resume")
        )
    except Exception as err:  # noqa: BLE001 (recorded for the test to judge)
        if not scenario.get("expect_error"):
            raise
        return {"error": f"{type(err).__name__}: {err}", "steps_started": counter.steps}
    return {
        "losses": recorder.losses,
        "grad_norms": recorder.grad_norms,
        "batches": recorder.batches,
        "steps_started": counter.steps,
        "all_reduces": all_reduces.calls,
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    results = {scenario["name"]: run(scenario, Path.cwd()) for scenario in spec["scenarios"]}
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        Path(spec["results"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
