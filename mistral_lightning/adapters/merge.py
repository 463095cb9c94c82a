"""LoRA adapters folded into their base weights (`W + scaling * B @ A`, in fp32), served as a WeightSource.

`export` writes such a source as an HF folder and the inference commands load it as a plain Mistral, so a
merged model runs at the base model's speed. The adapters come from a PEFT folder (`--adapter`) or from a
LoRA `fit` checkpoint, whose base is the `model.pretrained` folder it records.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mistral_lightning.adapters.lora import LoRAConfig, is_adapter_parameter
from mistral_lightning.adapters.peft_format import AdapterError, AdapterWeights, open_peft_adapter
from mistral_lightning.checkpoint.base import Index, ModelWeights, WeightSource, check_shapes
from mistral_lightning.checkpoint.hf import HFCheckpoint
from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint
from mistral_lightning.config import MistralConfig, parameter_shapes


class MergedWeights:
    """`base` with `adapters` merged in; reads stay lazy and sliceable, as the base's own."""

    def __init__(
        self, base: WeightSource, adapters: AdapterWeights, config: MistralConfig | None = None
    ) -> None:
        self.base, self.adapters = base, adapters
        self.config = config or base.config
        self.path = adapters.path
        self.scaling = adapters.lora.scaling
        self._merged = {name.rsplit(".", 2)[0] + ".weight" for name in adapters.adapter_names}
        check_shapes(base, parameter_shapes(self.config))

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def stored_name(self, name: str) -> str:
        return self.base.stored_name(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        own = self.adapters if name in self.adapters.base_weights else self.base
        weight = own.read(name, index)
        if name not in self._merged:
            return weight
        rows, columns = (index or ()) + (slice(None),) * (2 - len(index or ()))
        module = name.removesuffix(".weight")
        lora_a = self.adapters.read(f"{module}.lora_A.weight", (slice(None), columns)).float()
        lora_b = self.adapters.read(f"{module}.lora_B.weight", (rows, slice(None))).float()
        return weight.float() + self.scaling * (lora_b @ lora_a)

    def close(self) -> None:
        self.base.close()


def checkpoint_adapters(checkpoint: LightningCheckpoint) -> AdapterWeights:
    """The adapters of a LoRA `fit` checkpoint, with the LoRA settings its hyper-parameters record."""
    try:
        lora = LoRAConfig(**checkpoint.lora)
    except TypeError as err:
        raise AdapterError(
            f"{checkpoint.path}: the recorded LoRA settings {checkpoint.lora} are not valid ({err})"
        ) from err
    stored = {name: name for name in checkpoint.extra_tensor_names if is_adapter_parameter(name)}
    return AdapterWeights(checkpoint.path, lora, stored, checkpoint.shape, checkpoint.read, checkpoint.config)


def base_of(checkpoint: LightningCheckpoint) -> WeightSource:
    """The base weights of a LoRA `fit` checkpoint: its own, else those of the model.pretrained it records."""
    if checkpoint.holds_base:
        return checkpoint
    pretrained = Path(checkpoint.pretrained) if checkpoint.pretrained else None
    if pretrained is None or not pretrained.is_dir():
        raise AdapterError(
            f"{checkpoint.path}: holds LoRA adapters over model.pretrained={checkpoint.pretrained}, which is not a "
            "folder from here; run from where `fit` ran, or put that HF folder back in place"
        )
    return HFCheckpoint(pretrained)


def trained_weights(model: torch.nn.Module, lora: LoRAConfig | None, pretrained: str | None) -> WeightSource:
    """What a `fit` run trained, as full weights: the model's own, or with LoRA its adapters merged into the dense
    `pretrained` base (the one `export` of its checkpoint merges into; a QLoRA model holds only NF4 copies)."""
    weights = ModelWeights(model)
    if lora is None:
        return weights
    names = {name: name for name, _ in model.named_parameters() if is_adapter_parameter(name)}
    adapters = AdapterWeights(weights.path, lora, names, weights.shape, weights.read, model.config)
    return MergedWeights(HFCheckpoint(pretrained) if pretrained else weights, adapters, model.config)


def with_adapters(source: WeightSource, adapter: str | Path | None = None) -> WeightSource:
    """`source` with its LoRA adapters merged: a PEFT `adapter` folder over it, or the adapters of a LoRA `fit`
    checkpoint over its base; `source` itself when there are none."""
    lora_checkpoint = isinstance(source, LightningCheckpoint) and source.lora
    if lora_checkpoint and adapter is not None:
        raise AdapterError(
            f"{source.path} is a LoRA checkpoint with its own adapters; --adapter {adapter} would stack a second "
            "one: pass the base HF folder as --checkpoint with --adapter, or the LoRA checkpoint alone"
        )
    if lora_checkpoint:
        return MergedWeights(base_of(source), checkpoint_adapters(source), source.config)
    if adapter is not None:
        return MergedWeights(source, open_peft_adapter(adapter, source.config))
    return source


__all__ = ["MergedWeights", "base_of", "checkpoint_adapters", "trained_weights", "with_adapters"]
