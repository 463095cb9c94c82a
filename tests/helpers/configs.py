"""One tiny `fit` config that every CLI-level test starts from: the `tiny` model preset in fp32 on the CPU,
Lightning's ModelParallelStrategy named as a user would, quiet, no logger or checkpoints, pretraining data
packed with cross-document attention. Tests state only what differs (`changes`, merged key by key)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


def tiny_fit_config(
    root: Path,
    data_prefix: str,
    *,
    data_parallel: int = 1,
    tensor_parallel: int = 1,
    seq_length: int = 32,
    micro_batch_size: int = 2,
    **changes: Any,
) -> dict:
    """The base config with `changes` (top-level sections: seed_everything, trainer, model, data) merged in."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": data_parallel * tensor_parallel,
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": data_parallel, "tensor_parallel_size": tensor_parallel},
            },
            "precision": "32-true",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": False,
            "default_root_dir": str(root),
        },
        "model": {"model_config": "tiny", "optimizer": {"lr": 1e-3}, "init_seed": 3},
        "data": {
            "class_path": "mistral_lightning.data.datamodules.PretrainDataModule",
            "init_args": {
                "data_prefixes": [data_prefix],
                "seq_length": seq_length,
                "micro_batch_size": micro_batch_size,
                "split": "1,0,0",
                "num_workers": 0,
                "cross_document_attention": True,
            },
        },
    }
    return _merged(config, changes)


def _merged(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and "class_path" not in value:
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_config(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path
