"""Reading a DCP checkpoint folder without running code its pickles may carry, or reading outside it.

torch's `FileSystemReader` unpickles `.metadata` with plain `pickle.load`, and DCP loads the non-tensor
entries of the data files (an optimizer's hyper-parameters) with `torch.load(weights_only=False)`: a crafted
checkpoint runs whatever it holds. Here `.metadata` is unpickled with an allow-list of the classes DCP
writes into it, which builds instances of those classes only (never sets attributes on a class), the data
files it names must lie inside the folder, and the non-tensor entries are unpickled weights-only. Anything
else is refused with one line naming the file and `--trust-checkpoint`. Every load of a DCP folder, on
every rank, reads through `dcp_reader` and `WeightsOnlyLoadPlanner`, so no unchecked read follows a check.
(`meta.pt` and `.ckpt` files go through `base.load_torch_file`, which is weights-only too.)
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PurePosixPath

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner stores bytes with
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from mistral_lightning.checkpoint.base import CheckpointError, UnsafeCheckpointError

DCP_METADATA = ".metadata"
TRUST_HINT = "if you trust where this checkpoint came from, pass --trust-checkpoint to load it anyway"

# What torch.distributed.checkpoint pickles into `.metadata` (torch/distributed/checkpoint/metadata.py
# and filesystem.py): its dataclasses, torch.Size, dtypes, layouts by name, and the recorded path.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
}


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


# The pure-Python unpickler, because its opcodes can be overridden: the C one cannot refuse a BUILD.
class _MetadataUnpickler(pickle._Unpickler):
    """Builds only the classes DCP metadata is made of: any other global is refused before it is looked up,
    and BUILD (setting attributes) only applies to instances of those classes, never to a class itself."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or dtype:
            return super().find_class(module, name)
        raise _Refused(f"the pickled object {module}.{name}")

    def load_build(self) -> None:
        target = self.stack[-2]  # the object the state on top of the stack goes into
        kind = type(target)
        if (kind.__module__, kind.__qualname__) not in _METADATA_CLASSES:
            described = (
                f"{target.__module__}.{target.__qualname__}" if isinstance(target, type) else kind.__name__
            )
            raise _Refused(f"an instruction that sets attributes on {described}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def entry_path(folder: Path, name: str, recorded_in: Path) -> Path:
    """`folder / name` for a file name a checkpoint records, refused unless it stays inside `folder`."""
    relative = PurePosixPath(str(name))
    if not str(name) or relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(
            f"{recorded_in}: names the file {str(name)!r}, which is not inside {folder}; a checkpoint only "
            "refers to its own files, so this one was altered: use a checkpoint written by fit"
        )
    return folder / relative


def read_dcp_metadata(folder: Path, *, trust_pickle: bool = False) -> Metadata:
    """The `.metadata` of a DCP folder, unpickled with the allow-list unless trusted, its data files inside."""
    path = Path(folder) / DCP_METADATA
    try:
        with path.open("rb") as stream:
            unpickler = pickle.Unpickler(stream) if trust_pickle else _MetadataUnpickler(stream)
            metadata = unpickler.load()
    except _Refused as err:
        raise UnsafeCheckpointError(
            f"{path}: holds {err.what}, which DCP metadata never contains and which could run code or change "
            f"this program when loaded; {TRUST_HINT}"
        ) from err
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing, so the checkpoint save did not finish") from err
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as err:
        raise CheckpointError(f"{path}: truncated or corrupt ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        entry_path(Path(folder), info.relative_path, path)
    return metadata


class _CheckedReader(FileSystemReader):
    """torch's DCP FileSystemReader over metadata already read and checked by `read_dcp_metadata`."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return self._metadata


def dcp_reader(
    folder: Path, *, trust_pickle: bool = False, metadata: Metadata | None = None
) -> FileSystemReader:
    """A DCP storage reader of `folder`: its `.metadata` read here, once, through the checks (or `metadata`,
    read so before), so a failure is one line before DCP starts and DCP never reads the file itself."""
    if metadata is None:
        metadata = read_dcp_metadata(folder, trust_pickle=trust_pickle)
    return _CheckedReader(Path(folder), metadata)


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, unpickling each non-tensor entry weights-only (unless trusted) where DCP's own
    runs any pickle."""

    def __init__(self, folder: Path, *, trust_pickle: bool = False) -> None:
        super().__init__()
        self.folder, self.trust_pickle = folder, trust_pickle

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=not self.trust_pickle)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{self.folder}: the entry {fqn!r} of its data files holds pickled Python objects besides plain "
                f"values, which could run code when loaded; {TRUST_HINT}"
            ) from err
        # Stored as DefaultLoadPlanner.load_bytes stores it.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def checkpoint_failure(err: CheckpointException) -> BaseException:
    """Our one-line error behind DCP's CheckpointException (it gathers one exception per failing rank), or
    the first failure when none of them is ours."""
    failures = [failure[0] for failure in err.failures.values()]
    return next((failure for failure in failures if isinstance(failure, CheckpointError)), failures[0])


def check_dcp_entries(folder: Path, metadata: Metadata) -> None:
    """Refuse a DCP folder whose non-tensor entries hold anything but plain data (weights-only)."""
    entries = [
        key for key, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)
    ]
    if not entries:
        return
    try:
        # Checking in one process is what we mean, so DCP's warning about the missing process group is noise.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                dict.fromkeys(entries),
                storage_reader=dcp_reader(folder, metadata=metadata),
                planner=WeightsOnlyLoadPlanner(folder),
                no_dist=True,
            )
    except CheckpointException as err:
        failure = checkpoint_failure(err)
        if isinstance(failure, CheckpointError):
            raise failure from err
        raise CheckpointError(
            f"{folder}: its data files cannot be read ({type(failure).__name__}: {failure})"
        ) from err


__all__ = [
    "DCP_METADATA",
    "TRUST_HINT",
    "WeightsOnlyLoadPlanner",
    "check_dcp_entries",
    "checkpoint_failure",
    "dcp_reader",
    "entry_path",
    "read_dcp_metadata",
]
