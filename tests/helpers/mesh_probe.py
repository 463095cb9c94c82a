"""A callback for multi-node tests: each rank writes where it runs and which global ranks share its
tensor-parallel and data-parallel groups, as the process groups themselves report them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from torch.distributed import get_process_group_ranks


class MeshProbe(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mesh = pl_module.device_mesh
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "tensor_parallel_group": get_process_group_ranks(mesh["tensor_parallel"].get_group()),
            "data_parallel_group": get_process_group_ranks(mesh["data_parallel"].get_group()),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
