"""HF checkpoints: config.json plus model.safetensors or sharded safetensors with an index.

Reading is lazy and can return only a slice of each tensor, so a tensor-parallel (or FSDP) rank
reads just its own shard and no rank ever holds the full model. Writing produces folders that
`transformers.MistralForCausalLM.from_pretrained` loads unchanged, with the model's tokenizer files.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mistral_lightning.checkpoint.base import CheckpointError, Index, WeightSource, fill_model
from mistral_lightning.checkpoint.tokenizer_files import COMPANION_PATTERNS, write_companion_files
from mistral_lightning.config import MistralConfig, parameter_shapes
from mistral_lightning.outputs import FolderKind, OutputFolder, OutputTarget, as_target

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# What a folder save_hf wrote holds; --overwrite replaces only such a folder.
HF_OUTPUT = FolderKind(
    "HF model folder",
    patterns=(
        "config.json",
        SAFETENSORS_FILE,
        "model-*-of-*.safetensors",
        SAFETENSORS_INDEX,
        *COMPANION_PATTERNS,
    ),
    required="config.json",
)
# Buffers some Llama-era checkpoints saved beside the weights; recomputed from rope_theta, so not dropped weights.
_IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Our parameter names and HF MistralForCausalLM's, with {i} for the layer number.
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
_TO_HF = [
    (re.compile(re.escape(ours).replace(re.escape("{i}"), r"(?P<i>\d+)")), theirs)
    for ours, theirs in _NAME_PAIRS
]


def _tensor_names(file: Path) -> list[str]:
    """The tensor names in one safetensors file, which must be complete (it is memory-mapped)."""
    try:
        with safe_open(file, "pt") as handle:
            return list(handle.keys())  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as err:
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({size} bytes; {err}); it is probably truncated or "
            "empty, e.g. by an interrupted download or copy: fetch or copy it again"
        ) from err


def to_hf_name(name: str) -> str:
    """Our parameter name -> the HF tensor name, e.g. 'layers.0.attn.q.weight' -> 'model.layers.0.self_attn.q_proj.weight'."""
    for pattern, target in _TO_HF:
        match = pattern.fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    raise CheckpointError(f"no HF name for parameter {name!r}")


class HFCheckpoint:
    """An HF folder as a WeightSource: our parameter names in, lazily read (slices of) HF tensors out."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.path = Path(hf_dir)
        if not self.path.is_dir():
            raise CheckpointError(
                f"{self.path}: not a folder; pass an HF model folder (config.json + *.safetensors)"
            )
        self.config = MistralConfig.from_hf(self.path)
        self._file_of = self._tensor_files()
        self._check_nothing_dropped()
        self._handles: dict[str, object] = {}
        self._stack = ExitStack()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
            files = sorted({self.path / file for file in weight_map.values()})
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{index} lists {file.name}, which is missing from {self.path}")
        elif (self.path / SAFETENSORS_FILE).is_file():
            files = [self.path / SAFETENSORS_FILE]
        else:
            raise CheckpointError(
                f"{self.path}: no weights found (expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}); "
                "convert .bin checkpoints to safetensors first"
            )
        # Each file's header is read now, so a truncated file is named before anything is written.
        return {name: file for file in files for name in _tensor_names(file)}

    def _check_nothing_dropped(self) -> None:
        """Every tensor in the files must be one of the model's parameters: anything else (biases,
        experts, extra heads) would be silently lost on loading or converting."""
        expected = {to_hf_name(name) for name in parameter_shapes(self.config)}
        extra = sorted(n for n in self._file_of if n not in expected and not _IGNORED_TENSORS.fullmatch(n))
        if extra:
            shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            raise CheckpointError(
                f"{self.path}: holds {len(extra)} tensor(s) a Mistral model has no place for ({shown}); loading "
                "or converting it would drop them, so it is refused: only dense Mistral/Llama weights without "
                "biases are supported"
            )

    def _handle(self, hf_name: str):
        if hf_name not in self._file_of:
            raise CheckpointError(f"{self.path}: tensor {hf_name!r} is missing from the checkpoint")
        file = str(self._file_of[hf_name])
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, "pt"))
        return self._handles[file]

    @property
    def dtype(self) -> torch.dtype:
        return self.read("embed.weight", (slice(0, 1),)).dtype

    def stored_name(self, name: str) -> str:
        return to_hf_name(name)

    def shape(self, name: str) -> tuple[int, ...]:
        hf_name = to_hf_name(name)
        return tuple(self._handle(hf_name).get_slice(hf_name).get_shape())

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        """Our parameter `name`, or only `[index]` of it, read from disk (via safetensors slices)."""
        hf_name = to_hf_name(name)
        try:
            handle = self._handle(hf_name)
            return handle.get_tensor(hf_name) if index is None else handle.get_slice(hf_name)[index]
        finally:
            # Unmap the files, so that pages read for earlier tensors do not pile up in RSS.
            self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


def load_hf_weights(model: nn.Module, checkpoint: HFCheckpoint | str | Path) -> None:
    """Fill `model` from an HF folder in place; a DTensor parameter reads only its rank's slice."""
    if not isinstance(checkpoint, HFCheckpoint):
        checkpoint = HFCheckpoint(checkpoint)
    try:
        fill_model(model, checkpoint)
    finally:
        checkpoint.close()


class _ShardWriter:
    """Streams HF-named tensors into safetensors shards of at most `max_shard_bytes` inside `folder`."""

    def __init__(self, folder: Path, dtype: torch.dtype | None, max_shard_bytes: int | None) -> None:
        self.folder, self.dtype = folder, dtype
        self.max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0
        self.saved_dtype: torch.dtype | None = None

    def add(self, hf_name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", self.dtype or tensor.dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[hf_name] = tensor
        self._pending_bytes += nbytes
        self._total_bytes += nbytes
        self.saved_dtype = self.saved_dtype or tensor.dtype

    def _flush(self) -> None:
        number = len(self._shards) + 1
        save_file(self._pending, self.folder / f"shard-{number:05d}.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        """Name the shards as transformers expects, with an index when there are several."""
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
            os.replace(self.folder / f"shard-{number:05d}.safetensors", self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if len(self._shards) > 1:
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def _layer_of(name: str) -> int | None:
    match = re.match(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def save_hf(
    source: WeightSource,
    out_dir: OutputTarget | str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    is_writer: bool = True,
    progress: Callable[[str], None] | None = None,
    files_from: str | Path | None = None,
) -> Path:
    """Write `source` as an HF folder a server can use as it is: the weights in `dtype` (None keeps
    each tensor's own), config.json naming it, and the tokenizer, chat-template and generation files of
    the HF folder `files_from`, copied unchanged (a generation_config.json with BOS/EOS ids without one).

    The one HF writer, behind `convert --saver hf`, `export` and `fit --export_hf_dir`: the folder is
    written under a temporary name and published as outputs.py describes (`overwrite` replaces only a
    previous HF output). Tensor by tensor, so peak memory stays near one shard; a sharded model
    (ModelWeights) is gathered one tensor at a time, so every rank must call this and only the one with
    `is_writer` writes. `progress` hears of each finished layer.
    """
    target = as_target(out_dir, overwrite=overwrite)
    folder = OutputFolder(target, HF_OUTPUT) if is_writer else nullcontext()
    num_layers = source.config.num_layers
    with folder as tmp:
        shards = _ShardWriter(tmp, dtype, max_shard_bytes) if is_writer else None
        for layer, names in itertools.groupby(parameter_shapes(source.config), key=_layer_of):
            for name in names:
                tensor = source.read(name)
                if shards is not None:
                    shards.add(to_hf_name(name), tensor)
            if layer is not None and progress is not None:
                progress(f"[{layer + 1}/{num_layers}] layer {layer} converted")
        if shards is not None:
            shards.finish()
            torch_dtype = str(shards.saved_dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(source.config.to_hf_dict(torch_dtype), indent=2))
            write_companion_files(None if files_from is None else Path(files_from), source.config, tmp)
    return target.path


__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX",
    "HF_OUTPUT",
    "CheckpointError",
    "HFCheckpoint",
    "load_hf_weights",
    "save_hf",
    "to_hf_name",
]
