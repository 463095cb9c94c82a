"""A training checkpoint is complete and safe to read, or it is not used: the mark a finished save
leaves, and how every reader checks a checkpoint before loading it.

`fit` (mistral_lightning.training.strategy) writes each checkpoint under a temporary name, adds `complete.json`
last (a save id that meta.pt records too, DCP's own save id from `.metadata`, the step, and every file
with its size), and only then renames it into place. A DCP folder counts as complete when its
`.metadata`, meta.pt and data files match that record. Folders written without it (by Lightning's own
ModelParallelStrategy, or before) count when `.metadata`, meta.pt and every byte range `.metadata` names
are there. Every check reads the pickles without running code (safe_pickle.py, base.load_torch_file):
a checkpoint that would run code is refused, never skipped in silence.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from mistral_lightning.checkpoint.base import CheckpointError, UnsafeCheckpointError, load_torch_file
from mistral_lightning.checkpoint.safe_pickle import (
    DCP_METADATA,
    check_dcp_entries,
    entry_path,
    read_dcp_metadata,
)

MARKER = "complete.json"
LIGHTNING_METADATA = "meta.pt"  # ModelParallelStrategy's non-tensor state beside the DCP files
SAVE_ID = "checkpoint_save_id"  # the key under which meta.pt records the save it belongs to
LAST_PREFIX = "last"  # ModelCheckpoint's `last.ckpt` (and last-v1.ckpt, ...)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint that passed the checks: where it is and the training step it holds."""

    path: Path
    global_step: int | None

    def describe(self) -> str:
        return f"{self.path} (step {self.global_step})" if self.global_step is not None else str(self.path)


def new_save_id() -> str:
    return uuid.uuid4().hex


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _files(folder: Path) -> dict[str, int]:
    return {
        file.relative_to(folder).as_posix(): file.stat().st_size
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.name != MARKER
    }


def write_completion_marker(folder: Path, save_id: str, global_step: int) -> None:
    """Mark a fully written DCP folder complete: called once every rank has written its files."""
    files = _files(folder)
    for name in files:  # on disk before the mark that vouches for them
        _fsync(folder / name)
    record = {
        "save_id": save_id,
        "dcp_save_id": read_dcp_metadata(folder).storage_meta.save_id,
        "global_step": global_step,
        "files": files,
    }
    partial = folder / f"{MARKER}.tmp"
    with partial.open("w") as stream:
        json.dump(record, stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, folder / MARKER)  # the mark is whole or absent
    _fsync(folder)


def _check_marker(folder: Path, saved: dict, dcp_save_id: str | None) -> None:
    marker = folder / MARKER
    try:
        record = json.loads(marker.read_text())
        files, save_id = dict(record["files"]), record["save_id"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{marker}: unreadable ({err}), so the save did not finish") from err
    if saved.get(SAVE_ID) != save_id or record.get("dcp_save_id") != dcp_save_id:
        raise CheckpointError(
            f"{folder}: {LIGHTNING_METADATA}, {DCP_METADATA} and {MARKER} come from different saves"
        )
    for name, size in files.items():
        file = entry_path(folder, name, marker)
        if not file.is_file() or file.stat().st_size != size:
            found = file.stat().st_size if file.is_file() else "missing"
            raise CheckpointError(f"{file}: {found} where {MARKER} records {size} bytes")


def _check_byte_ranges(folder: Path, metadata) -> None:
    """A checkpoint without the marker: every byte range `.metadata` names must be on disk."""
    for info in (metadata.storage_data or {}).values():
        file = folder / info.relative_path
        end = info.offset + info.length
        if not file.is_file() or file.stat().st_size < end:
            found = f"{file.stat().st_size} bytes" if file.is_file() else "missing"
            raise CheckpointError(f"{file}: {found} where {DCP_METADATA} needs {end}")


def read_saved_state(folder: Path, *, trust_pickle: bool = False) -> dict:
    """Lightning's non-tensor state beside a DCP folder's tensors (meta.pt), weights-only unless trusted."""
    meta_file = folder / LIGHTNING_METADATA
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing, so the checkpoint save did not finish")
    saved = load_torch_file(meta_file, trust_pickle=trust_pickle)
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"{meta_file}: holds a {type(saved).__name__}, not Lightning's checkpoint state"
        )
    return saved


def inspect_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> CheckpointInfo:
    """Check a `fit` checkpoint (DCP folder or single file) before anything loads it.

    Raises UnsafeCheckpointError if reading it could run code (unless trusted), CheckpointError (the
    reason in one line) if it is missing or incomplete.
    """
    path = Path(path)
    if path.is_file():
        saved = load_torch_file(path, trust_pickle=trust_pickle)
        if not isinstance(saved, dict) or "state_dict" not in saved:
            raise CheckpointError(f"{path}: no 'state_dict' entry; is this a Lightning checkpoint?")
        return CheckpointInfo(path, saved.get("global_step"))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    metadata = read_dcp_metadata(path, trust_pickle=trust_pickle)
    saved = read_saved_state(path, trust_pickle=trust_pickle)
    if not trust_pickle:
        check_dcp_entries(path, metadata)
    if (path / MARKER).is_file():
        _check_marker(path, saved, metadata.storage_meta.save_id if metadata.storage_meta else None)
    elif SAVE_ID in saved:
        raise CheckpointError(f"{path}: no {MARKER}, so the checkpoint save did not finish")
    else:
        _check_byte_ranges(path, metadata)
    return CheckpointInfo(path, saved.get("global_step"))


def _saved_at(entry: Path) -> int:
    """When a checkpoint's save finished: the time of the file a save writes last."""
    for name in (MARKER, LIGHTNING_METADATA, DCP_METADATA):
        if (entry / name).is_file():
            return (entry / name).stat().st_mtime_ns
    return entry.stat().st_mtime_ns


def _candidates(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, newest first; a hidden folder counts once its save marked it complete
    (a save interrupted while renaming leaves the finished checkpoint under its temporary name)."""
    if not folder.is_dir():
        return []
    found = [
        entry
        for entry in folder.iterdir()
        if entry.name.endswith(".ckpt") or (entry.name.startswith(".") and (entry / MARKER).is_file())
    ]
    return sorted(found, key=_saved_at, reverse=True)


def newest_complete_checkpoint(
    folder: str | Path, *, trust_pickle: bool = False
) -> tuple[CheckpointInfo | None, list[str]]:
    """The newest complete checkpoint in `folder` and why each newer one was passed over.

    A newer checkpoint that would run code is refused (UnsafeCheckpointError), not passed over.
    """
    passed_over: list[str] = []
    for candidate in _candidates(Path(folder)):
        try:
            return inspect_checkpoint(candidate, trust_pickle=trust_pickle), passed_over
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            passed_over.append(str(err))
    return None, passed_over


def last_good_checkpoint(folder: str | Path) -> str:
    """'the last good checkpoint is ...', for the messages of a run that stops."""
    try:
        info, _ = newest_complete_checkpoint(folder)
    except CheckpointError as err:
        return f"no checkpoint in {folder} passes the checks ({err})"
    if info is None:
        return f"no complete checkpoint is in {folder} yet"
    return f"the last good checkpoint is {info.describe()}"


def checkpoint_to_load(path: str | Path, *, trust_pickle: bool = False) -> tuple[CheckpointInfo, str | None]:
    """The checkpoint to load when `path` is asked for, and a note when it is another one.

    `path` itself if complete. A `last*.ckpt` that is incomplete or missing stands for "the newest
    complete checkpoint of its folder", so that one is used; any other incomplete path is refused,
    naming the newest complete one.
    """
    path = Path(path)
    try:
        return inspect_checkpoint(path, trust_pickle=trust_pickle), None
    except UnsafeCheckpointError:
        raise
    except CheckpointError as err:
        problem = str(err)
    newest, _ = newest_complete_checkpoint(path.parent, trust_pickle=trust_pickle)
    if newest is None:
        raise CheckpointError(f"{problem}; no complete checkpoint is in {path.parent} to use instead")
    if not path.name.startswith(LAST_PREFIX):
        raise CheckpointError(
            f"{problem}; the newest complete checkpoint there is {newest.describe()}: pass it to --ckpt_path"
        )
    return newest, f"{problem}; using {newest.describe()}, the newest complete checkpoint, instead"


def resolve_last(folders: list[str | Path], *, trust_pickle: bool = False) -> tuple[Path | None, str | None]:
    """What `--ckpt_path last` means over ModelCheckpoint folders: the newest complete checkpoint, with
    a note when that is not the folder's `last.ckpt` (missing, incomplete, or older than another).
    (None, note) when there are only incomplete ones: the run starts from the beginning."""
    best: tuple[int, CheckpointInfo, list[str]] | None = None
    incomplete: list[str] = []
    for folder in folders:
        info, passed_over = newest_complete_checkpoint(folder, trust_pickle=trust_pickle)
        incomplete += passed_over
        if info is not None and (best is None or _saved_at(info.path) > best[0]):
            best = (_saved_at(info.path), info, passed_over)
    if best is None:
        if not incomplete:
            return None, None  # nothing there at all: Lightning's own `last` says so
        return (
            None,
            f"--ckpt_path last: no complete checkpoint ({'; '.join(incomplete)}); starting from the beginning",
        )
    _, info, passed_over = best
    last = info.path.parent / f"{LAST_PREFIX}.ckpt"
    if info.path.name.startswith(LAST_PREFIX) and info.path.suffix == ".ckpt":
        return info.path, None
    why = "; ".join(passed_over) or (f"{last} is older" if last.exists() else f"there is no {last}")
    return (
        info.path,
        f"--ckpt_path last: resuming from {info.describe()}, the newest complete checkpoint ({why})",
    )


__all__ = [
    "LIGHTNING_METADATA",
    "MARKER",
    "SAVE_ID",
    "CheckpointInfo",
    "checkpoint_to_load",
    "inspect_checkpoint",
    "last_good_checkpoint",
    "new_save_id",
    "newest_complete_checkpoint",
    "read_saved_state",
    "resolve_last",
    "write_completion_marker",
]
