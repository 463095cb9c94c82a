"""LoRA as a plan applied from outside the model: chosen linear layers gain low-rank adapters, the rest freezes.

A target `nn.Linear` keeps its identity (and so any tensor-parallel hooks and DTensor weight it already has)
and its parameter names: its class becomes `LoRALinear`, which adds `lora_A` and `lora_B` children and
computes `W x + (alpha / rank) * B A dropout(x)`, as Hugging Face PEFT's `LoraModel` does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from mistral_lightning.errors import UserError

# Our module names of the linear layers an adapter may target; "lm_head" is the (vocab-parallel) output layer.
ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
LORA_TARGETS = (*ATTENTION_TARGETS, *MLP_TARGETS, "lm_head")
ADAPTER_PARAMETERS = ("lora_A", "lora_B")


class LoRAError(UserError):
    """A LoRA option or adapter that cannot be applied to this model."""


@dataclass(frozen=True)
class LoRAConfig:
    """`model.lora`: rank, alpha (scaling alpha / rank), dropout on the adapter's input, and the target layers
    (names in LORA_TARGETS, or "all-linear" for all of them but lm_head, as PEFT's shorthand means)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ATTENTION_TARGETS  # str: "all-linear"
    # QLoRA: "nf4" stores the frozen block projections in 4-bit NF4 (adapters/nf4.py); "none" keeps them dense.
    quantize_base: str = "none"
    # A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) whose weights the adapters start
    # from, e.g. to continue training one; its rank, alpha and targets must be the ones above.
    adapter: str | None = None

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if targets == ("all-linear",):
            targets = (*ATTENTION_TARGETS, *MLP_TARGETS)
        object.__setattr__(self, "targets", targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise LoRAError(
                f"model.lora.targets: {unknown or 'none given'} not among {list(LORA_TARGETS)} (or 'all-linear')"
            )
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise LoRAError(f"model.lora.rank={self.rank!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"model.lora.dropout={self.dropout!r} must be in [0, 1)")
        if self.quantize_base not in ("none", "nf4"):
            raise LoRAError(f"model.lora.quantize_base={self.quantize_base!r} is not one of 'none', 'nf4'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a low-rank adapter; made by `apply_lora` from an existing layer, never built directly."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    enabled = True  # False (adapters_disabled): the base layer alone, e.g. as a preference loss's reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return result
        adapter_input = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return result + self.lora_B(self.lora_A(adapter_input)).to(result.dtype) * self.scaling


def _add_adapter(layer: nn.Linear, config: LoRAConfig) -> None:
    device = layer.weight.device
    layer.__class__ = LoRALinear
    layer.lora_A = nn.Linear(layer.in_features, config.rank, bias=False, device=device)
    layer.lora_B = nn.Linear(config.rank, layer.out_features, bias=False, device=device)
    layer.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
    layer.scaling = config.scaling


def target_layers(model: nn.Module, targets: tuple[str, ...]) -> Iterator[tuple[str, nn.Linear]]:
    """(name, layer) of every linear layer whose last name part is one of `targets`."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            yield name, module


def apply_lora(model: nn.Module, config: LoRAConfig) -> None:
    """Add adapters to the target layers in place (on the meta device too) and freeze every other parameter."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in list(target_layers(model, config.targets)):
        _add_adapter(layer, config)


def shard_adapters(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Give each adapter the tensor-parallel layout of its layer, so the adapted layer adds no collective to
    the forward: a column-parallel layer (weight Shard(0)) gets B sharded by output rows and A replicated, its
    output sharded like the base's; a row-parallel one (weight Shard(1)) gets A sharded by input columns and B
    replicated, its output partial like the base's, reduced by the layer's existing output hook."""
    for name, layer in lora_layers(model):
        weight = layer.weight
        placement = weight.placements[0] if isinstance(weight, DTensor) else None
        if placement == Shard(0):
            layouts = ((layer.lora_A, Replicate()), (layer.lora_B, Shard(0)))
        elif placement == Shard(1):
            layouts = ((layer.lora_A, Shard(1)), (layer.lora_B, Replicate()))
        else:
            raise LoRAError(
                f"model.lora.targets: {name} is not split by the tensor-parallel plan (its weight is "
                f"{placement or 'not a DTensor'}), so its adapter has no layout; drop it from the targets or "
                "set tensor_parallel_size: 1"
            )
        for adapter, layout in layouts:
            sharded = distribute_tensor(adapter.weight, tp_mesh, [layout], src_data_rank=None)
            adapter.weight = nn.Parameter(sharded, requires_grad=adapter.weight.requires_grad)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The model computes its base function inside the block: no second copy of the weights is needed for it."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def is_adapter_parameter(name: str) -> bool:
    return any(part in ADAPTER_PARAMETERS for part in name.split("."))


class WithoutAdapters:
    """A model seen without its adapters, for the readers of base-model checkpoints (HF, Megatron), which fill
    every parameter `named_parameters` lists and know no adapter names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = getattr(model, "config", None)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if not is_adapter_parameter(n))


@torch.no_grad()
def init_adapter_(name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """PEFT's default initialisation: A as `nn.Linear`'s (Kaiming uniform, a=sqrt(5)), B zero, so training starts
    from the base model's function."""
    if ".lora_B." in f".{name}":
        tensor.zero_()
    else:
        bound = 1.0 / math.sqrt(tensor.shape[1])  # kaiming_uniform_ with a=sqrt(5) on [rank, in_features]
        tensor.uniform_(-bound, bound, generator=generator)
