"""Pieces of the checkpoint-safety tests: a `fit` config for the CLI, code-running payloads planted into a
checkpoint the way an attacker would (rewriting every file that would give them away), a full disk
injected into a save, and readers of what a run left behind (its logged losses, a checkpoint's tensors).
"""

from __future__ import annotations

import builtins
import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from helpers.configs import tiny_fit_config, write_config
from helpers.processes import start_ranks

MARKER = "complete.json"  # what a finished save of `fit` vouches with (checkpoint/integrity.py)

CHECKPOINT_EVERY = 2
MAX_STEPS = 6
# The `tiny` preset with a vocabulary that just covers the toy data: checkpoints of 4 MB instead of 50.
SMALL_VOCAB = {
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_layers": 2,
    "num_heads": 4,
}
SMALL_VOCAB |= {"num_kv_heads": 2, "head_dim": 16, "sliding_window": 64, "max_seq_length": 512}


def fit_config(
    root: Path, data_prefix: str, *, lr: float = 1e-3, every: int = CHECKPOINT_EVERY, model_config="tiny"
) -> Path:
    """A tiny one-process `fit` on toy data: DCP checkpoints every `every` steps plus last.ckpt, losses
    logged every step to CSV."""
    config = tiny_fit_config(
        root,
        data_prefix,
        seed_everything=1234,
        trainer={
            "max_steps": MAX_STEPS,
            "gradient_clip_val": 1.0,
            "enable_checkpointing": True,
            "default_root_dir": None,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root / "logs"), "name": "", "version": "first"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "checkpoints"),
                        "filename": "{step}",
                        "every_n_train_steps": every,
                        "save_top_k": -1,
                        "save_last": True,
                    },
                }
            ],
        },
        model={"model_config": model_config, "optimizer": {"lr": lr}},
    )
    return write_config(config, root / "fit.yaml")


def logged_losses(root: Path, version: str = "first") -> dict[int, float]:
    """step -> train/loss as the CSV logger wrote it (Python float repr: exact)."""
    rows = csv.DictReader((root / "logs" / version / "metrics.csv").open())
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}


def dcp_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (weights and optimizer state), read with torch's own reader."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(folder).read_metadata()
    state = {
        key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    return state


# ---------------------------------------------------------------------- payloads
class CreatesFile:
    """Unpickling this runs code: it creates `path` (the tests assert that it never exists)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.path!r}, 'w').close()",))


def _remark(folder: Path) -> None:
    """What an attacker does next: make complete.json vouch for the altered files again."""
    marker = folder / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        record["files"] = {name: (folder / name).stat().st_size for name in record["files"]}
        marker.write_text(json.dumps(record))


def _rewrite_metadata(folder: Path, change) -> None:
    with (folder / ".metadata").open("rb") as stream:
        metadata = pickle.load(stream)  # our own test checkpoint, before it is poisoned
    change(metadata)
    with (folder / ".metadata").open("wb") as stream:
        pickle.dump(metadata, stream)
    _remark(folder)


def plant_in_dcp_metadata(folder: Path, payload: object) -> None:
    """`.metadata` carries `payload` in its planner_data (a field DCP pickles as it finds it)."""

    def change(metadata) -> None:
        metadata.planner_data = {"payload": payload, **(metadata.planner_data or {})}

    _rewrite_metadata(folder, change)


def plant_in_meta_pt(folder: Path, payload: object) -> None:
    meta = torch.load(folder / "meta.pt", weights_only=True)
    meta["payload"] = payload
    torch.save(meta, folder / "meta.pt")
    _remark(folder)


def plant_in_dcp_entry(folder: Path, payload: object, entry: str = "optimizer_0.param_groups.0.lr") -> str:
    """A non-tensor entry of the data files (which DCP loads with weights_only=False) becomes `payload`."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)

    def change(metadata) -> None:
        assert isinstance(metadata.state_dict_metadata[entry], BytesStorageMetadata)
        (index,) = [index for index in metadata.storage_data if index.fqn == entry]
        info = metadata.storage_data[index]
        data_file = folder / info.relative_path
        offset = data_file.stat().st_size
        with data_file.open("ab") as stream:
            stream.write(buffer.getvalue())
        metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buffer.getvalue()))

    _rewrite_metadata(folder, change)
    return entry


# ---------------------------------------------------------------------- a full disk
class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does: part written, ENOSPC."""

    def __init__(self, stream, room: int) -> None:
        self.stream, self.room = stream, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        left = self.room - self.stream.tell()
        if len(data) > left:
            self.stream.write(data[: max(left, 0)])
            self.stream.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.stream.write(data)

    def tell(self) -> int:
        return self.stream.tell()

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()


def fill_disk_while_writing(where: str, checkpoint_name: str, patch=setattr) -> None:
    """From now on, writing the checkpoint `checkpoint_name` hits a full disk: in its DCP data file
    (`where="data"`, after 4 KiB) or in meta.pt (half of it written). `patch`: setattr or monkeypatch's."""
    if where == "data":
        original_stream = FileSystem.create_stream

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with original_stream(self, path, mode) as stream:
                full = checkpoint_name in str(path) and str(path).endswith(".distcp")
                yield _FullDisk(stream, room=4096) if full else stream

        patch(FileSystem, "create_stream", create_stream)
        return
    original_save = torch.save

    def save(obj, target, *args, **kwargs):
        if not (isinstance(target, (str, os.PathLike)) and checkpoint_name in str(target)):
            return original_save(obj, target, *args, **kwargs)
        buffer = io.BytesIO()
        original_save(obj, buffer, *args, **kwargs)
        Path(target).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    patch(torch, "save", save)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting exit code 2 and exactly one `mistral-lightning ...: error` line, no traceback."""
    from mistral_lightning.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mistral-lightning ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


FAULT_RUNNER = Path(__file__).with_name("checkpoint_fault_run.py")
TP2 = ["--trainer.devices", "2", "--trainer.strategy.init_args.tensor_parallel_size", "2"]


def launch_fit_ranks(argv: list[str], cwd: Path, fault: str = "-") -> list[tuple[int, str]]:
    """`fit` on two TP ranks as torchrun starts them, `fault` as checkpoint_fault_run.py takes it;
    (exit code, stderr) per rank."""
    procs = start_ranks(
        [sys.executable, str(FAULT_RUNNER), fault, *argv, *TP2],
        2,
        cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return [(proc.wait(timeout=600), proc.stderr.read()) for proc in procs]
