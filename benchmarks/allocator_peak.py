"""A real run's peak allocated tensor memory on the CPU, measured by the allocator itself.

While the profiler records memory, c10's CPU allocator keeps a running total of the bytes it has handed out
and reports it with every allocation: the CPU counterpart of `torch.cuda.max_memory_allocated`. Nothing of
the memory plan's machinery (FakeTensorMode, the trackers) is involved, so it can judge the plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from mistral_lightning.devices import peak_memory


def peak_allocated_bytes(prof: profile) -> int:
    """The largest running total of allocated bytes among the allocations `prof` recorded."""
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
        stack.extend(event.children)
    return peak


class AllocatorPeak(L.Callback):
    """Records allocations from `setup` (before the model exists) to the end of `fit`; each rank writes
    `rank{N}.json` with its peak allocated bytes and its process's peak RSS into `out_dir`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self._profiler: profile | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.start()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._profiler.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        result = {
            "peak_allocated_bytes": peak_allocated_bytes(self._profiler),
            "peak_rss_bytes": peak_memory(torch.device("cpu"))["peak_rss"],
            "steps": trainer.global_step,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
