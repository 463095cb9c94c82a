"""Runs `mistral-lightning fit` several times, each in a forked child, killing a child at a chosen file
operation of a checkpoint save, as kill -9 would (os._exit: no cleanup, no flush).

usage: checkpoint_kill_worker.py SPEC.json, where SPEC holds "runs": [{"argv": [...], "kill_at": n | null,
"events": path | null}] and "results": path. Torch and Lightning are imported once; forked children start
warm. The file operations of a save, counted from 0 over the whole run:
  dcp-data          before DCP writes the data files            dcp-data-half   after, cut to half (mid-write)
  dcp-finish        before DCP writes .metadata                 torch.save      before meta.pt is written
  torch.save-half   after, meta.pt cut to half                  os.rename/os.replace/shutil.rmtree   before each
Only operations inside Trainer.save_checkpoint count; "save <path>" lines (not kill points) delimit saves.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch.distributed.checkpoint import FileSystemWriter

from mistral_lightning.cli import main as cli_main

KILLED = 17


class FaultPlan:
    def __init__(self, kill_at: int | None, events: Path | None) -> None:
        self.kill_at, self.count, self.saving = kill_at, 0, False
        self.log = events.open("w") if events else None

    def event(self, label: str, after=None) -> None:
        """One file operation; at the chosen one the process dies (after `after` runs, if given)."""
        if not self.saving:
            return
        if self.log:
            self.log.write(f"{self.count} {label}\n")
            self.log.flush()
        if self.count == self.kill_at:
            if after is not None:
                after()
            os._exit(KILLED)
        self.count += 1

    def note(self, line: str) -> None:
        if self.log:
            self.log.write(f"- {line}\n")
            self.log.flush()


def _cut_to_half(path: Path) -> None:
    with path.open("r+b") as stream:
        stream.truncate(path.stat().st_size // 2)


def install(plan: FaultPlan) -> None:
    def wrap(owner, name, label, half=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            plan.event(
                f"{label} {' '.join(map(str, args[:2]))}" if label.startswith(("os.", "shutil")) else label
            )
            result = original(*args, **kwargs)
            if half is not None:
                target = half(*args)
                if target is not None:
                    plan.event(f"{label}-half {target}", after=lambda: _cut_to_half(target))
            return result

        setattr(owner, name, wrapper)

    def data_files(writer, *args) -> Path | None:
        files = sorted(Path(writer.path).glob("*.distcp"))
        return files[0] if files else None

    def saved_path(obj, target, *args) -> Path | None:
        return Path(target) if isinstance(target, (str, os.PathLike)) else None

    original_torch_save = torch.save

    def torch_save(obj, target, *args, **kwargs):
        if not isinstance(target, (str, os.PathLike)):  # DCP's tensors into its data files
            return original_torch_save(obj, target, *args, **kwargs)
        plan.event(f"torch.save {Path(target).name}")
        original_torch_save(obj, target, *args, **kwargs)
        plan.event(f"torch.save-half {target}", after=lambda: _cut_to_half(Path(target)))

    torch.save = torch_save
    wrap(FileSystemWriter, "write_data", "dcp-data", half=data_files)
    wrap(FileSystemWriter, "finish", "dcp-finish")
    wrap(os, "rename", "os.rename")
    wrap(os, "replace", "os.replace")
    wrap(shutil, "rmtree", "shutil.rmtree")

    original_save = Trainer.save_checkpoint

    def save_checkpoint(self, filepath, *args, **kwargs):
        plan.note(f"save {filepath}")
        plan.saving = True
        try:
            return original_save(self, filepath, *args, **kwargs)
        finally:
            plan.saving = False

    Trainer.save_checkpoint = save_checkpoint


def run(argv: list[str], kill_at: int | None, events: str | None) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            install(FaultPlan(kill_at, Path(events) if events else None))
            code = cli_main(argv)
        except BaseException as err:  # noqa: BLE001 (reported through the exit code)
            print(f"{type(err).__name__}: {err}", file=sys.stderr)
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    codes = [run(item["argv"], item.get("kill_at"), item.get("events")) for item in spec["runs"]]
    Path(spec["results"]).write_text(json.dumps(codes))


if __name__ == "__main__":
    main()
