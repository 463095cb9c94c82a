"""What every checkpoint format shares: the weight-source protocol, filling a model from any source,
and loading torch files without running code. (Output folders are written through `outputs.py`.)

A format module (hf, megatron, lightning_ckpt) describes its layout and hands out our parameters by
name as a WeightSource; everything that moves weights between formats or into a model goes through it.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mistral_lightning.config import MistralConfig
from mistral_lightning.errors import UserError

# Which part of a tensor to read, one slice per dimension from the first.
Index = tuple[slice, ...]


class CheckpointError(UserError):
    """A checkpoint on disk is missing, incomplete or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled objects that could run code; loaded only with --trust-checkpoint."""


class WeightSource(Protocol):
    """A checkpoint that hands out (slices of) our parameters by name, whatever its layout."""

    config: MistralConfig
    path: Path  # where the weights come from, for messages

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (the embedding's)."""
        ...

    def stored_name(self, name: str) -> str:
        """The name our parameter `name` has in this checkpoint, for messages."""
        ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: Index | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


class ModelWeights:
    """A model's own parameters as a WeightSource, e.g. to save them in another format.

    DTensors are gathered when read, so with a sharded model every rank must read the same names in
    the same order.
    """

    def __init__(self, model: nn.Module) -> None:
        self.config: MistralConfig = model.config
        self.path = Path(f"<{type(model).__name__} in memory>")
        # state_dict, not named_parameters: FSDP2 hands out its sharded parameters only there.
        self._tensors = model.state_dict()

    @property
    def dtype(self) -> torch.dtype:
        return self._tensors["embed.weight"].dtype

    def stored_name(self, name: str) -> str:
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        tensor = self._tensors[name]
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        return tensor if index is None else tensor[index]

    def close(self) -> None:
        self._tensors = {}


def check_shapes(source: WeightSource, expected: dict[str, tuple[int, ...]]) -> None:
    """Catch a config that does not fit the weights before anything is read or written."""
    for name, shape in expected.items():
        stored = tuple(source.shape(name))
        if stored != tuple(shape):
            raise CheckpointError(
                f"{source.path}: tensor {source.stored_name(name)!r} has shape {list(stored)} but the model "
                f"config expects {list(shape)}; does the config (config.json, --model-config or the one "
                "recorded in the checkpoint) match the weights?"
            )


def local_chunk(param: torch.Tensor) -> Index | None:
    """For a DTensor, the part of the global tensor this rank holds; None for a plain tensor."""
    if not isinstance(param, DTensor):
        return None
    # The chunk list is what torch.distributed.checkpoint saves and loads a DTensor by: one chunk per rank.
    (chunk,) = param.__create_chunk_list__()
    return tuple(slice(start, start + size) for start, size in zip(chunk.offsets, chunk.sizes))


@torch.no_grad()
def fill_model(model: nn.Module, source: WeightSource) -> None:
    """Copy `source`'s weights into `model`'s parameters in place, cast to each parameter's dtype.

    Plain or DTensor parameters alike; a DTensor rank reads only its own slice from the source, so
    no rank holds the whole model. Every shape is checked before the first parameter is written.
    """
    params = dict(model.named_parameters())
    check_shapes(source, {name: tuple(param.shape) for name, param in params.items()})
    for name, param in params.items():
        index = local_chunk(param)
        if index is None:
            param.copy_(source.read(name))
        else:
            param.to_local().copy_(source.read(name, index))


def load_torch_file(path: Path, *, trust_pickle: bool = False) -> Any:
    """torch.load, memory-mapped so tensors are paged in only when read; pickled code runs only if trusted."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=not trust_pickle)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # Files from torch < 1.6 (legacy format) cannot be memory-mapped.
                return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the line naming the refused global is what matters.
        found = re.search(r"WeightsUnpickler error: (.+?)(?: was not an allowed global.*)?$", str(err), re.M)
        reason = found.group(1) if found else str(err).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path}: holds pickled Python objects besides tensors ({reason}), which could run code when "
            "loaded; if you trust where this checkpoint came from, pass --trust-checkpoint to load it anyway"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err


__all__ = [
    "CheckpointError",
    "Index",
    "ModelWeights",
    "UnsafeCheckpointError",
    "WeightSource",
    "check_shapes",
    "fill_model",
    "load_torch_file",
    "local_chunk",
]
