"""Checkpoints written by `fit` (Lightning's ModelParallelStrategy), read back as plain parameters.

Two forms: a torch.distributed.checkpoint (DCP) folder, whose tensors may be DTensor shards of any
TP/FSDP layout, and a single `.ckpt` file (torch.save). Both keep the weights under `state_dict` as
`model.<our name>`. DCP is read without a process group, one parameter at a time, so the whole
model is never held in memory at once. The architecture comes from --model-config, else the
`mistral_config` that `fit` records in the checkpoint, else a config.json inside or next to it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mistral_lightning.checkpoint.base import CheckpointError, Index, check_shapes, load_torch_file
from mistral_lightning.checkpoint.integrity import inspect_checkpoint, read_saved_state
from mistral_lightning.checkpoint.safe_pickle import DCP_METADATA, dcp_reader, read_dcp_metadata
from mistral_lightning.config import ConfigError, MistralConfig, parameter_shapes

STATE_DICT = "state_dict"
RECORDED_CONFIG = "mistral_config"  # MistralLightningModule.on_save_checkpoint stores the architecture here
HYPER_PARAMETERS = (
    "hyper_parameters"  # Lightning's record of the module's arguments, model.pretrained among them
)
# Module wrappers that compile / activation checkpointing / FSDP1 insert into parameter names.
_WRAPPER_SEGMENTS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


def parameter_name(key: str) -> str:
    """'model._orig_mod.layers.0.attn.q.weight' -> 'layers.0.attn.q.weight' (the LightningModule holds the
    Mistral as `self.model`)."""
    name = ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)
    return name.removeprefix("model.")


def find_model_config(path: Path, saved_state: dict) -> MistralConfig:
    """The architecture `fit` recorded in the checkpoint, else a config.json inside or next to it."""
    recorded = saved_state.get(RECORDED_CONFIG)
    if recorded is not None:
        try:
            return MistralConfig(**recorded)
        except (TypeError, ConfigError) as err:
            raise CheckpointError(f"{path}: the recorded '{RECORDED_CONFIG}' is not valid ({err})") from err
    for folder in (path, path.parent) if path.is_dir() else (path.parent,):
        if (folder / "config.json").is_file():
            return MistralConfig.from_hf(folder)
    raise CheckpointError(
        f"{path}: records no '{RECORDED_CONFIG}' and has no config.json inside or next to it; pass "
        "--model-config with a preset name (e.g. mistral-7b-32k, tiny) or the HF folder training started from"
    )


class LightningCheckpoint:
    """Our parameters from a `fit` checkpoint (DCP folder or single file), whatever TP/DP it was saved with."""

    def __init__(
        self, path: str | Path, *, model_config: MistralConfig | None = None, trust_pickle: bool = False
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint file or folder")
        # The non-tensor state; Lightning saves hyper-parameters as a plain dict, so it loads with
        # weights_only (other pickled objects need --trust-checkpoint).
        if self.path.is_dir():
            if not (self.path / DCP_METADATA).is_file():
                raise CheckpointError(
                    f"{self.path}: a folder without {DCP_METADATA}, so not a distributed checkpoint; pass "
                    "the folder `fit` saved (or its single .ckpt file)"
                )
            # Complete, and no pickle in it runs code (its .metadata, meta.pt and non-tensor entries).
            inspect_checkpoint(self.path, trust_pickle=trust_pickle)
            # What is used is read through the checks again: the files may have been replaced since.
            self._dcp_metadata = read_dcp_metadata(self.path, trust_pickle=trust_pickle)
            saved_state = read_saved_state(self.path, trust_pickle=trust_pickle)
            self._state = None
        else:
            saved_state = load_torch_file(self.path, trust_pickle=trust_pickle)
            if not isinstance(saved_state, dict) or STATE_DICT not in saved_state:
                raise CheckpointError(
                    f"{self.path}: no '{STATE_DICT}' entry; is this a Lightning checkpoint?"
                )
            self._state = saved_state[STATE_DICT]
        self.config = model_config or find_model_config(self.path, saved_state)
        hyper_parameters = saved_state.get(HYPER_PARAMETERS) or {}
        # The HF folder training started from, as recorded (maybe relative to where `fit` ran).
        self.pretrained: str | None = hyper_parameters.get("pretrained") or None
        # A LoRA run records its adapter settings (LoRAConfig's fields); its checkpoints may hold only the adapters.
        self.lora: dict | None = hyper_parameters.get("lora") or None
        self._shapes = parameter_shapes(self.config)
        if self._state is None:
            self._keys, self._meta = self._dcp_index()
        else:
            self._keys = self._match(self._state)
        self.holds_base = all(name in self._keys for name in self._shapes)
        if self.holds_base:
            check_shapes(self, self._shapes)

    def _dcp_index(self) -> tuple[dict[str, str], dict[str, TensorStorageMetadata]]:
        metadata = self._dcp_metadata.state_dict_metadata
        tensors = {
            key.removeprefix(STATE_DICT + "."): meta
            for key, meta in metadata.items()
            if key.startswith(STATE_DICT + ".") and isinstance(meta, TensorStorageMetadata)
        }
        keys = self._match(tensors)
        return keys, {name: metadata[f"{STATE_DICT}.{key}"] for name, key in keys.items()}

    def _match(self, state: dict) -> dict[str, str]:
        """Our tensor name -> the checkpoint's key; every model parameter must be present, or (a LoRA
        checkpoint of the adapters alone) none."""
        keys = {parameter_name(key): key for key in state}
        missing = [name for name in self._shapes if name not in keys]
        if missing and not (self.lora and len(missing) == len(self._shapes)):
            raise CheckpointError(
                f"{self.path}: {len(missing)} model parameters are missing from '{STATE_DICT}' (e.g. "
                f"model.{missing[0]}); found keys like {sorted(state)[:3]}"
            )
        return keys

    @property
    def extra_tensor_names(self) -> list[str]:
        """The tensors besides the model's parameters, e.g. LoRA adapters, by our names."""
        return [name for name in self._keys if name not in self._shapes]

    def _key(self, name: str) -> str:
        if name not in self._keys and not self.holds_base:
            raise CheckpointError(
                f"{self.path}: a LoRA checkpoint holding only the adapters (its base is model.pretrained="
                f"{self.pretrained}); `mistral-lightning export` merges them into that base (or writes them with "
                "--lora-format peft), and generate/evaluate --checkpoint load it as it is"
            )
        return self._keys[name]

    @property
    def dtype(self) -> torch.dtype:
        key = self._key("embed.weight")
        if self._state is not None:
            return self._state[key].dtype
        return self._meta["embed.weight"].properties.dtype

    def stored_name(self, name: str) -> str:
        return self._key(name)

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._key(name)
        if self._state is not None:
            return tuple(self._state[key].shape)
        return tuple(self._meta[name].size)

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        key = self._key(name)
        if self._state is not None:
            tensor = self._state[key]
        else:
            meta = self._meta[name]
            tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            # DCP reassembles the full tensor from whatever shards the ranks saved. Loading in one
            # process is what we mean, so its warning about the missing process group is noise.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(
                    {f"{STATE_DICT}.{key}": tensor},
                    storage_reader=dcp_reader(self.path, metadata=self._dcp_metadata),
                    no_dist=True,
                )
        return tensor if index is None else tensor[index]

    def close(self) -> None:
        self._state = None


__all__ = ["LightningCheckpoint", "find_model_config", "parameter_name"]
