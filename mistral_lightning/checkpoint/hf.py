"""HF checkpoints: config.json plus model.safetensors or sharded safetensors with an index.

Reading is lazy and can fill only a slice of each tensor, so a tensor-parallel (or FSDP) rank
reads just its own shard and no rank ever holds the full model. Writing produces folders that
`transformers.MistralForCausalLM.from_pretrained` loads unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mistral_lightning.config import ConfigError, MistralConfig
from mistral_lightning.errors import UserError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# The dtype names the commands accept for saved or loaded weights.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Our parameter names and HF MistralForCausalLM's, with {i} for the layer number; one table serves both ways.
_NAME_PAIRS: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    *[(f"layers.{{i}}.attn.{p}.weight", f"model.layers.{{i}}.self_attn.{p}_proj.weight") for p in "qkvo"],
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *[
        (f"layers.{{i}}.mlp.{p}.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight")
        for p in ("gate", "up", "down")
    ],
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _rules(source: int) -> list[tuple[re.Pattern, str]]:
    """Regex rules from one side of _NAME_PAIRS to the other."""
    rules = []
    for pair in _NAME_PAIRS:
        pattern = re.escape(pair[source]).replace(re.escape("{i}"), r"(?P<i>\d+)")
        rules.append((re.compile(pattern), pair[1 - source]))
    return rules


_TO_HF, _FROM_HF = _rules(0), _rules(1)


class CheckpointError(UserError):
    """A checkpoint on disk is missing, incomplete or does not fit the model."""


def _translate(name: str, rules: list[tuple[re.Pattern, str]], kind: str) -> str:
    for pattern, target in rules:
        match = pattern.fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    raise CheckpointError(f"no {kind} name for parameter {name!r}")


def to_hf_name(name: str) -> str:
    return _translate(name, _TO_HF, "HF")


def from_hf_name(name: str) -> str:
    return _translate(name, _FROM_HF, "mistral-lightning")


class HFCheckpoint:
    """A lazily read HF folder: names, shapes and (sliced) tensors without loading whole files."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.path = Path(hf_dir)
        if not self.path.is_dir():
            raise CheckpointError(
                f"{self.path}: not a folder; pass an HF model folder (config.json + *.safetensors)"
            )
        self.config = MistralConfig.from_hf(self.path)
        self._file_of = self._tensor_files()
        self._handles: dict[str, object] = {}
        self._stack = ExitStack()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
            files = {name: self.path / file for name, file in weight_map.items()}
            for file in set(files.values()):
                if not file.is_file():
                    raise CheckpointError(f"{index} lists {file.name}, which is missing from {self.path}")
            return files
        single = self.path / SAFETENSORS_FILE
        if single.is_file():
            with safe_open(single, "pt") as handle:
                return {name: single for name in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
        raise CheckpointError(
            f"{self.path}: no weights found (expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}); "
            "convert .bin checkpoints to safetensors first"
        )

    def _handle(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file = self._file_of[name]
        if str(file) not in self._handles:
            self._handles[str(file)] = self._stack.enter_context(safe_open(file, "pt"))
        return self._handles[str(file)]

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the embedding, taken as the checkpoint's dtype."""
        return self.read("model.embed_tokens.weight", (slice(0, 1),)).dtype

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor `name`, or only `tensor[index]` read from disk (lazily, via safetensors slices)."""
        if index is None:
            return self._handle(name).get_tensor(name)
        return self._handle(name).get_slice(name)[index]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


def _local_index(param: torch.Tensor) -> tuple[slice, ...] | None:
    """For a DTensor parameter, the slice of the global tensor this rank holds; None for a plain tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return tuple(slice(start, start + size) for start, size in zip(offset, local_shape))


@torch.no_grad()
def load_hf_weights(model: nn.Module, checkpoint: HFCheckpoint | str | Path) -> None:
    """Copy HF weights into `model`'s parameters in place, reading only each rank's slice of DTensors."""
    if not isinstance(checkpoint, HFCheckpoint):
        checkpoint = HFCheckpoint(checkpoint)
    try:
        for name, param in model.named_parameters():
            hf_name = to_hf_name(name)
            stored_shape = checkpoint.shape(hf_name)
            if stored_shape != tuple(param.shape):
                raise CheckpointError(
                    f"{checkpoint.path}: tensor {hf_name!r} has shape {list(stored_shape)} but the model expects "
                    f"{list(param.shape)}; does config.json match the weights?"
                )
            index = _local_index(param)
            if index is None:
                param.copy_(checkpoint.read(hf_name))
            else:
                param.to_local().copy_(checkpoint.read(hf_name, index))
    finally:
        checkpoint.close()


def prepare_output_dir(out_dir: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Check the target and make a sibling temporary folder to write into; rename it at the end."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise CheckpointError(
            f"{out_dir}: exists and is not empty; choose another folder or pass --overwrite"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    return out_dir, tmp_dir


def finish_output_dir(tmp_dir: Path, out_dir: Path) -> Path:
    """Publish a fully written folder in one rename, so an interrupted write never looks complete."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir


class HFCheckpointWriter:
    """Streams HF-named tensors into safetensors shards of at most `max_shard_bytes`.

    Use as a context manager: the folder appears under its final name only when the block
    exits without an error; otherwise the partial folder is removed.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: MistralConfig,
        *,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        self.out_dir, self.tmp_dir = prepare_output_dir(out_dir, overwrite)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0
        self._saved_dtype: torch.dtype | None = None

    def add(self, hf_name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", self.dtype or tensor.dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[hf_name] = tensor
        self._pending_bytes += nbytes
        self._total_bytes += nbytes
        self._saved_dtype = self._saved_dtype or tensor.dtype

    def _flush(self) -> None:
        number = len(self._shards) + 1
        save_file(self._pending, self.tmp_dir / f"shard-{number:05d}.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _finish(self) -> Path:
        if self._pending:
            self._flush()
        if not self._shards:
            raise CheckpointError("no tensors were written")
        weight_map: dict[str, str] = {}
        for number, names in enumerate(self._shards, start=1):
            if len(self._shards) == 1:
                final = SAFETENSORS_FILE
            else:
                final = f"model-{number:05d}-of-{len(self._shards):05d}.safetensors"
            os.replace(self.tmp_dir / f"shard-{number:05d}.safetensors", self.tmp_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if len(self._shards) > 1:
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self.tmp_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        torch_dtype = str(self._saved_dtype).removeprefix("torch.")
        (self.tmp_dir / "config.json").write_text(json.dumps(self.config.to_hf_dict(torch_dtype), indent=2))
        return finish_output_dir(self.tmp_dir, self.out_dir)

    def __enter__(self) -> HFCheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish()
        else:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


def save_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    config: MistralConfig,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = True,
    is_writer: bool = True,
) -> Path:
    """Write our-named parameters as an HF folder. DTensors are gathered one at a time, so with a
    sharded model every rank must call this; only the one with `is_writer` writes."""
    writer = (
        HFCheckpointWriter(out_dir, config, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        if is_writer
        else nullcontext()
    )
    with writer:
        for name, tensor in state_dict.items():
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if is_writer:
                writer.add(to_hf_name(name), full)
    return Path(out_dir)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "HFCheckpoint",
    "HFCheckpointWriter",
    "finish_output_dir",
    "from_hf_name",
    "load_hf_weights",
    "prepare_output_dir",
    "save_hf_checkpoint",
    "to_hf_name",
]
