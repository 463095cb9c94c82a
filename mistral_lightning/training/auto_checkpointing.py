"""`model.parallel.activation_checkpointing: auto`: the fastest per-block mix that the memory plan says fits.

`fit` cannot simulate beside its own process group (the plan needs a fake one), so global rank 0 asks a child
process (`python -P -m mistral_lightning.training.auto_checkpointing`, the layout as JSON on stdin) for the mix,
and broadcasts it: every rank builds the same blocks. The child searches the layout's mixes only
(training/layouts.py): k blocks "none" or "selective", the rest "full", fitting the device less 10%, fastest by
the step time predicted with the device's calibration table (by card name, else the accelerator's); without one
(an NPU), the fewest recomputed FLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch

from mistral_lightning.child_processes import python_module_command, safe_path_env
from mistral_lightning.errors import UserError
from mistral_lightning.training.device_rates import device_table
from mistral_lightning.training.layouts import (
    TrainingLayout,
    layout_from_json,
    layout_to_json,
    search_layouts,
)
from mistral_lightning.training.parallel import describe_policies

HEADROOM = 0.1


def choose(
    layout: TrainingLayout, capacity_bytes: float, accelerator: str, card: str
) -> tuple[list[str], str]:
    """The mix, and the line that says why."""
    table = device_table(accelerator, card)
    base = dataclasses.replace(
        layout, parallel=dataclasses.replace(layout.parallel, activation_checkpointing="full")
    )
    candidates = search_layouts(base, capacity_bytes, table, HEADROOM, layouts=[base])
    if not candidates:
        raise UserError(
            f"model.parallel.activation_checkpointing: auto: even every block fully checkpointed does not fit "
            f"{capacity_bytes / 1e9:.1f} GB less {HEADROOM:.0%}; lower data.init_args.micro_batch_size or "
            "seq_length, or add devices"
        )
    best = candidates[0]
    policies = list(best.layout.parallel.activation_checkpointing)
    line = (
        f"activation_checkpointing auto: {describe_policies(policies)} (planned peak {best.peak_bytes / 1e9:.2f} GB of "
        f"{capacity_bytes / 1e9:.1f} GB, predicted {best.prediction.seconds:.3g} s/step with {table[min(table)].name})"
    )
    return policies, line


def resolve_in_child(
    layout: TrainingLayout, capacity_bytes: float, accelerator: str, card: str
) -> tuple[list[str], str]:
    """`choose`, run in a fresh process (a process group is up in this one)."""
    request = json.dumps(
        {
            "layout": layout_to_json(layout),
            "capacity": capacity_bytes,
            "accelerator": accelerator,
            "card": card,
        }
    )
    done = subprocess.run(
        python_module_command("mistral_lightning.training.auto_checkpointing"),
        input=request,
        capture_output=True,
        text=True,
        env=safe_path_env({**os.environ, "OMP_NUM_THREADS": "1"}),
    )
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise UserError(
            lines[-1] if lines else f"activation_checkpointing auto: the plan failed ({done.returncode})"
        )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer["policies"], answer["line"]


def broadcast_choice(
    layout: TrainingLayout, capacity_bytes: float, accelerator: str, card: str
) -> tuple[list[str], str]:
    """Rank 0's choice on every rank."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    message: list = [resolve_in_child(layout, capacity_bytes, accelerator, card) if rank == 0 else None]
    if distributed:
        torch.distributed.broadcast_object_list(message, src=0)
    return message[0]


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        policies, line = choose(
            layout_from_json(request["layout"]), request["capacity"], request["accelerator"], request["card"]
        )
    except UserError as error:
        print(str(error), file=sys.stderr)
        return 2
    print(json.dumps({"policies": policies, "line": line}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
