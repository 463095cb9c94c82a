"""QLoRA's base: the frozen linear weights of the blocks stored as torchao's 4-bit NormalFloat (NF4) tensors.

Every frozen projection of the blocks (q, k, v, o, gate, up, down) becomes an `NF4Tensor` (blocks of 64
weights with one absmax scaler each, the scalers themselves quantised to int8 in blocks of 256: Dettmers et
al.'s double quantisation, as torchtune's QLoRA recipes store Mistral). The embedding, the norms and the LM
head stay in the compute dtype, as in QLoRA. `F.linear` on an NF4Tensor dequantises the whole weight to the
input's dtype for that one call (torchao's `linear_nf4`), so only one layer's weight is ever held at full
precision, and the adapters of `lora.py` keep their own dtype. Pure PyTorch: CPU, CUDA and NPU alike.

`quantize_base_` makes them NF4 on the meta device, between the adapters and FSDP2 (`parallel.parallelize`);
`materialize_nf4_` gives them storage after `to_empty`; the loaders' `copy_` then quantises the weights into
them. FSDP2 (applied even on one data-parallel rank) leaves the NF4 weights out: each rank holds the
whole 4-bit base and FSDP2 shards the adapters and their optimizer state. Tensor parallelism is refused:
torchao's NF4 tensor splits only by rows, and o/down shard their columns.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mistral_lightning.adapters.lora import (
    ATTENTION_TARGETS,
    MLP_TARGETS,
    LoRAConfig,
    LoRAError,
    target_layers,
)

# QLoRA quantises every frozen projection of the blocks, adapted or not; lm_head and the embedding stay dense.
QUANTIZED_LAYERS = (*ATTENTION_TARGETS, *MLP_TARGETS)
# torchao's (and QLoRA's) defaults: one absmax per 64 weights, the absmaxes quantised in blocks of 256.
BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256


def _nf4_tensor():
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:
        raise LoRAError(
            "model.lora.quantize_base=nf4 needs torchao: pip install 'mistral-lightning[qlora]'"
        ) from None
    return NF4Tensor


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """torchao's NF4 tensor of `weight` (what its `to_nf4` returns, with QLoRA's block sizes)."""
    return _nf4_tensor().from_tensor(weight, BLOCK_SIZE, SCALER_BLOCK_SIZE)


def nf4_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes torchao's NF4Tensor holds for `numel` weights of `dtype`: two 4-bit codes per byte, one int8
    scaler per block, one `dtype` factor per scaler block, the scalers' mean and the 16-entry code book."""
    n_blocks = numel // BLOCK_SIZE
    itemsize = torch.empty((), dtype=dtype).element_size()
    return numel // 2 + n_blocks + (n_blocks // SCALER_BLOCK_SIZE + 1 + 16) * itemsize


def check_quantize_base(config: LoRAConfig | None, tensor_parallel_size: int) -> None:
    """One line, before any step, for a QLoRA layout that cannot run."""
    if config is not None and config.quantize_base == "nf4" and tensor_parallel_size > 1:
        raise LoRAError(
            f"model.lora.quantize_base=nf4 supports tensor_parallel_size=1 only (got {tensor_parallel_size}): "
            "torchao's NF4 weights cannot be split by columns; set "
            "trainer.strategy.init_args.tensor_parallel_size=1 (data parallelism works) or "
            "model.lora.quantize_base=none"
        )


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The frozen block projections QLoRA stores in NF4; refuses (one line) a weight torchao cannot block."""
    layers = list(target_layers(model, QUANTIZED_LAYERS))
    per_block = BLOCK_SIZE * SCALER_BLOCK_SIZE
    for name, layer in layers:
        if layer.weight.numel() % per_block:
            raise LoRAError(
                f"model.lora.quantize_base=nf4: {name}.weight {list(layer.weight.shape)} has "
                f"{layer.weight.numel()} elements, not a multiple of {per_block} (NF4 blocks of {BLOCK_SIZE}, "
                f"scalers in blocks of {SCALER_BLOCK_SIZE}); use a model whose layer sizes are multiples of 256 "
                "or model.lora.quantize_base=none"
            )
    return layers


@torch.no_grad()
def quantize_base_(model: nn.Module) -> set[nn.Parameter]:
    """Make the frozen block projections of a model on the meta device (adapters applied, FSDP2 not yet)
    NF4 parameters, and return them: FSDP2 must leave them out (`fully_shard(..., ignored_params=...)`).

    Each rank holds the whole 4-bit base, as data-parallel QLoRA does; FSDP2 shards the adapters and their
    optimizer state only. (torch's FSDP2 passes one of the three NF4 all-gather inputs on a one-rank mesh,
    and torchao's row split keeps the whole tensor's block count, so sharded NF4 cannot be loaded in place.)
    The weights are filled after `materialize_nf4_`: a plain tensor copied into an NF4 tensor is quantised
    (`NF4Tensor.copy_`), which is how `load_hf_weights` and `init_weights` fill every parameter.
    """
    quantized = set()
    for name, layer in quantizable_layers(model):
        if layer.weight.requires_grad:
            raise LoRAError(
                f"model.lora.quantize_base=nf4: {name}.weight is trainable; QLoRA quantises frozen weights only"
            )
        weight = to_nf4(layer.weight.detach())
        layer.weight = nn.Parameter(weight, requires_grad=False)
        quantized.add(layer.weight)
    return quantized


def nf4_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The layers whose weight is NF4 (none, and no torchao import, where nothing was quantised)."""
    for name, layer in target_layers(model, QUANTIZED_LAYERS):
        if hasattr(layer.weight, "quantized_data") and isinstance(layer.weight, _nf4_tensor()):
            yield name, layer


@torch.no_grad()
def materialize_nf4_(model: nn.Module) -> None:
    """After `model.to_empty(device)`: fresh NF4 tensors on the device, ready for the weights' `copy_`
    (torchao's `empty_like` leaves the scalers' mean and the code book on the meta device)."""
    for _, layer in nf4_layers(model):
        weight = layer.weight
        device = weight.quantized_data.device
        placeholder = torch.ones(weight.shape, dtype=weight.dtype, device=device)
        layer.weight = nn.Parameter(to_nf4(placeholder), requires_grad=False)
