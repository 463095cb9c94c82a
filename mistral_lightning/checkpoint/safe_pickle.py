"""Reading the pickles inside a DCP checkpoint folder without running code they may carry.

torch's `FileSystemReader` unpickles `.metadata` with plain `pickle.load`, and DCP loads the non-tensor
entries of the data files (an optimizer's hyper-parameters) with `torch.load(weights_only=False)`: a crafted
checkpoint runs whatever it holds. Here `.metadata` is unpickled with an allow-list of the classes DCP
writes into it, and the non-tensor entries with torch's weights-only unpickler. Anything else is refused
with one line naming the file and `--trust-checkpoint`. (`meta.pt` and `.ckpt` files go through
`base.load_torch_file`, which is weights-only too.)
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
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


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes DCP metadata is made of; any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or dtype:
            return super().find_class(module, name)
        raise _RefusedGlobal(module, name)


def read_dcp_metadata(folder: Path, *, trust_pickle: bool = False, filename: str = DCP_METADATA) -> Metadata:
    """The `.metadata` of a DCP folder, unpickled with the allow-list unless trusted."""
    path = Path(folder) / filename
    try:
        with path.open("rb") as stream:
            unpickler = pickle.Unpickler(stream) if trust_pickle else _MetadataUnpickler(stream)
            metadata = unpickler.load()
    except _RefusedGlobal as err:
        raise UnsafeCheckpointError(
            f"{path}: holds the pickled object {err.qualified_name}, which DCP metadata never contains and "
            f"which could run code when loaded; {TRUST_HINT}"
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
    ) as err:
        raise CheckpointError(f"{path}: truncated or corrupt ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's DCP FileSystemReader, reading `.metadata` through the allow-list (unless trusted)."""

    def __init__(self, path: str | Path, *, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self.trust_pickle = trust_pickle

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        filename = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
        metadata = read_dcp_metadata(Path(self.path), trust_pickle=self.trust_pickle, filename=filename)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


class _WeightsOnlyBytesCheck(DefaultLoadPlanner):
    """Unpickles each non-tensor entry weights-only, to refuse it before DCP's own load would run it."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{self.folder}: the entry {read_item.dest_index.fqn!r} of its data files holds pickled Python "
                f"objects besides plain values, which could run code when loaded; {TRUST_HINT}"
            ) from err


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
                storage_reader=SafeFileSystemReader(folder),
                planner=_WeightsOnlyBytesCheck(folder),
                no_dist=True,
            )
    except CheckpointException as err:
        # DCP gathers each rank's exception; ours are the one-line ones.
        failures = [failure[0] for failure in err.failures.values()]
        for failure in failures:
            if isinstance(failure, CheckpointError):
                raise failure from err
        raise CheckpointError(
            f"{folder}: its data files cannot be read ({type(failures[0]).__name__}: {failures[0]})"
        ) from err


__all__ = ["DCP_METADATA", "TRUST_HINT", "SafeFileSystemReader", "check_dcp_entries", "read_dcp_metadata"]
