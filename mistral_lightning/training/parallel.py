"""The parallel plan: how the plain `Mistral` module is spread over a (data_parallel, tensor_parallel) mesh.

Applied from outside the model, as torchtitan does, in this order: tensor/sequence parallelism
(DTensor), LoRA adapters (sharded like the layers they adapt), activation checkpointing, `torch.compile` per block, then FSDP2 over the data-parallel
dimension. Checkpointing and compiling use APIs that keep parameter names unchanged, so HF and
distributed checkpoints see the same names whatever the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial, reduce
from typing import Literal

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mistral_lightning.adapters.lora import (
    LoRAConfig,
    apply_lora,
    init_adapter_,
    is_adapter_parameter,
    shard_adapters,
)
from mistral_lightning.adapters.nf4 import quantize_base_
from mistral_lightning.config import MistralConfig
from mistral_lightning.errors import UserError
from mistral_lightning.model import Mistral
from mistral_lightning.training.context_parallel import apply_context_parallel

CheckpointPolicyName = Literal["none", "full", "selective"]
POLICIES: tuple[str, ...] = ("none", "full", "selective")
# One policy for every block, a list of one per block (a mix), or "auto" (fit takes the plan's fastest mix that
# fits its device, training/auto_checkpointing.py).
ActivationCheckpointing = CheckpointPolicyName | Literal["auto"] | list[CheckpointPolicyName]


@dataclass(frozen=True)
class ParallelConfig:
    """`model.parallel`: the plan's options; the mesh sizes are the strategy's (trainer.strategy.init_args).

    sequence_parallel: shard the norms and the residual stream on the sequence under TP.
    activation_checkpointing: "none", "full" (recompute each block) or "selective" (keep matmul outputs) for
        every block; a list of one of those per block (e.g. `[none, none, full, full]`); or "auto": the fastest
        mix of "full" with "none" or "selective" blocks that the memory plan says fits the device.
    compile: `torch.compile` each block (and the loss's softmax/gradient step); "auto" (the default) does on CUDA
        when every batch has one width (pretraining data; instruction data padded to seq_length), where a block
        compiles once, without context parallelism, and runs eager elsewhere (`compiles`).
    """

    sequence_parallel: bool = True
    activation_checkpointing: ActivationCheckpointing = "none"
    compile: bool | Literal["auto"] = "auto"


def layer_policies(mode: ActivationCheckpointing, num_layers: int) -> list[str]:
    """Each block's checkpointing policy, from a config's `activation_checkpointing` ("auto" resolved before)."""
    policies = [mode] * num_layers if isinstance(mode, str) else list(mode)
    wrong = sorted({policy for policy in policies if policy not in POLICIES})
    if wrong or len(policies) != num_layers:
        given = mode if isinstance(mode, str) else f"a list of {len(policies)}"
        raise UserError(
            f"model.parallel.activation_checkpointing={given!r}: give one of 'none', 'full', 'selective', 'auto', or "
            f"a list of one of the first three per block ({num_layers} blocks)"
        )
    return policies


def describe_policies(policies: list[str]) -> str:
    """A per-block list as a reader wants it: "full", or "2 none + 30 full"."""
    counts = {policy: policies.count(policy) for policy in POLICIES if policy in policies}
    return next(iter(counts)) if len(counts) == 1 else " + ".join(f"{n} {p}" for p, n in counts.items())


# Selective checkpointing keeps the outputs of the expensive operators and recomputes the cheap,
# memory-hungry ones (norms, rotary, SwiGLU, casts) in the backward pass. Operators are matched by name, so
# no backend's library has to be imported to name its operators.
SAVED_OPS_BY_BACKEND = {
    # CPU and CUDA linear layers decompose to mm/addmm/bmm; attention runs as one of the SDPA kernels.
    "portable": (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    ),
    # flash-attn (2.6+) registers its kernels as torch custom operators.
    "flash": ("flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward"),
    # FlexAttention is a higher-order operator; selective checkpointing's modes handle it by this name.
    "flex": ("flex_attention",),
    # torch_npu registers its own autograd for matmul, so Ascend linear layers reach the policy as aten::matmul.
    "npu": ("aten::matmul", "aten::linear", "npu::npu_fusion_attention", "npu::npu_fusion_attention_v3"),
}
_SAVED_OPS = frozenset(name for names in SAVED_OPS_BY_BACKEND.values() for name in names)


def check_parallel_config(
    config: MistralConfig, tp_size: int, sequence_parallel: bool, seq_length: int | None
) -> None:
    """Fail early, naming the option to change, for layouts the plan cannot shard evenly."""
    if config.num_kv_heads % tp_size:
        raise UserError(
            f"tensor_parallel_size={tp_size} does not divide the model's {config.num_kv_heads} KV heads; "
            "choose a tensor_parallel_size that divides num_kv_heads (trainer.strategy.init_args)"
        )
    if config.vocab_size % tp_size:
        raise UserError(
            f"tensor_parallel_size={tp_size} does not divide vocab_size={config.vocab_size}; "
            "the vocab-parallel embedding and LM head need equal shards"
        )
    if sequence_parallel and tp_size > 1 and seq_length is not None and seq_length % tp_size:
        raise UserError(
            f"sequence parallelism needs the sequence length ({seq_length}) to be divisible by "
            f"tensor_parallel_size={tp_size}; change data.seq_length or set model.parallel.sequence_parallel: false"
        )


def apply_tensor_parallel(model: Mistral, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron-style TP: vocab-parallel embedding and LM head, column-parallel q/k/v/gate/up,
    row-parallel o/down; with SP the norms and the residual stream are sharded on the sequence."""
    residual = Shard(1) if sequence_parallel else Replicate()
    # The LM head yields logits sharded on the vocabulary (a DTensor) for `loss_parallel`; its input is
    # the final hidden state gathered once, so the chunked loss can slice it like a plain tensor.
    plan: dict[str, nn.Module] = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "lm_head": ColwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
        ),
    }
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, plan)
    if sequence_parallel:
        parallelize_module(
            model.norm,
            tp_mesh,
            PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate()),
        )

    for block in model.layers:
        block_plan: dict[str, nn.Module] = {
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(output_layouts=residual),
            "mlp.gate": ColwiseParallel(),
            "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            # Attention(x, cos, sin, document_ids, kv_cache) and FeedForward(x): gather x from the
            # sequence shards before the column-parallel projections.
            block_plan.update(
                {
                    "attn_norm": SequenceParallel(),
                    "attn": PrepareModuleInput(
                        input_layouts=(Shard(1), None, None, None, None),
                        desired_input_layouts=(Replicate(), None, None, None, None),
                    ),
                    "mlp_norm": SequenceParallel(),
                    "mlp": PrepareModuleInput(
                        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                    ),
                }
            )
        parallelize_module(block, tp_mesh, block_plan)


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op.name() in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Mistral, mode: ActivationCheckpointing) -> None:
    selective = partial(create_selective_checkpoint_contexts, _selective_policy)
    for block, policy in zip(model.layers, layer_policies(mode, len(model.layers)), strict=True):
        if policy != "none":
            # The composable API registers hooks instead of wrapping, so parameter names stay the same.
            checkpoint(block, context_fn=selective if policy == "selective" else None)


def compiles(setting: bool | str, device_type: str, fixed_width: bool | None, context_parallel: bool) -> bool:
    """`compile` resolved for a run: "auto" compiles on CUDA when the DataModule says every batch has one width
    (each new width compiles the blocks again) and without context parallelism (its halo exchange has not been
    run compiled). On the CPU a short run's first-step compile outweighs its gain, and an NPU compiles through
    torchair, which this plan does not drive."""
    if setting == "auto":
        return device_type == "cuda" and bool(fixed_width) and not context_parallel
    return bool(setting)


def apply_compile(model: Mistral) -> None:
    # Module.compile() compiles in place (no `_orig_mod` wrapper), keeping parameter names unchanged.
    # Static shapes: with dynamic shapes, torch 2.13's inductor fails on the attention block on the CPU
    # ("mul expected 2 arguments, got 3"). Each new batch length compiles once more: with padded SFT
    # batches, pad to a coarse multiple (data.pad_to_multiple_of) or pack them.
    for block in model.layers:
        block.compile(fullgraph=False, dynamic=False)


def apply_fsdp(
    model: Mistral,
    dp_mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    ignored_params: set[nn.Parameter] | None = None,
) -> None:
    """FSDP2 per block and for the whole model, sharding parameters over the data-parallel ranks, except
    `ignored_params` (QLoRA's NF4 weights, which every rank holds whole)."""
    ignored = ignored_params or None
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, ignored_params=ignored)
    # The root keeps embedding, final norm and LM head; gathering them once per step is cheapest.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False, ignored_params=ignored)
    # Training calls `model.loss(...)` or `model.token_log_probs(...)`, not `model(...)`: FSDP must gather
    # parameters around them too.
    register_fsdp_forward_method(model, "loss")
    register_fsdp_forward_method(model, "token_log_probs")


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for Lightning's precision flag: bf16 compute with fp32 master weights and reductions.

    No input cast: the blocks' inputs are already in the compute dtype (the embedding's output, and RoPE
    tables made in its dtype), and the cast runs outside a checkpointed block in the forward but inside it
    in the recompute, which selective checkpointing refuses.
    """
    if str(precision).startswith("bf16-mixed"):
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    if str(precision).startswith("16-mixed"):
        return MixedPrecisionPolicy(
            param_dtype=torch.float16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    return MixedPrecisionPolicy()


def parallelize(
    model: Mistral,
    mesh: DeviceMesh,
    *,
    sequence_parallel: bool = ParallelConfig.sequence_parallel,
    activation_checkpointing: ActivationCheckpointing = ParallelConfig.activation_checkpointing,
    compile: bool = False,
    mp_policy: MixedPrecisionPolicy | None = None,
    seq_length: int | None = None,
    lora: LoRAConfig | None = None,
) -> Mistral:
    """Apply the whole plan to a model built on the meta device; mesh dims: data_parallel, tensor_parallel.

    lora: add adapters to its targets and freeze the rest, after TP (the adapters take their layer's layout)
    and before checkpointing, compile and FSDP2 (which then shard frozen and trainable parameters alike).
    """
    tp_mesh, dp_mesh = mesh["tensor_parallel"], sharding_mesh(mesh)
    check_parallel_config(model.config, tp_mesh.size(), sequence_parallel, seq_length)
    if tp_mesh.size() > 1:
        apply_tensor_parallel(model, tp_mesh, sequence_parallel)
    if CONTEXT_PARALLEL in mesh.mesh_dim_names:
        apply_context_parallel(model, mesh[CONTEXT_PARALLEL].get_group())
    if lora is not None:
        apply_lora(model, lora)
        if tp_mesh.size() > 1:
            shard_adapters(model, tp_mesh)
    # QLoRA: the frozen block projections become NF4 (TP > 1 is refused before this, by check_quantize_base).
    nf4_base = quantize_base_(model) if lora is not None and lora.quantize_base == "nf4" else set()
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    # Applied even with one data-parallel rank: parameters become DTensors, which is what Lightning's
    # distributed checkpoints (and their resharding to another TP size) are built on.
    apply_fsdp(model, dp_mesh, mp_policy or MixedPrecisionPolicy(), ignored_params=nf4_base)
    return model


CONTEXT_PARALLEL = "context_parallel"


def build_device_mesh(device_type: str, data: int, context: int, tensor: int) -> DeviceMesh:
    """The training mesh: (data_parallel, tensor_parallel), with context_parallel between them when it is
    used; tensor parallelism innermost, so that its ranks share a node."""
    if context == 1:
        return init_device_mesh(
            device_type, (data, tensor), mesh_dim_names=("data_parallel", "tensor_parallel")
        )
    return init_device_mesh(
        device_type,
        (data, context, tensor),
        mesh_dim_names=("data_parallel", CONTEXT_PARALLEL, "tensor_parallel"),
    )


def context_parallel_group(mesh: DeviceMesh) -> torch.distributed.ProcessGroup | None:
    """The process group of this rank's context-parallel peers (the shards of its sequences), None without."""
    return mesh[CONTEXT_PARALLEL].get_group() if CONTEXT_PARALLEL in mesh.mesh_dim_names else None


def sharding_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks FSDP2 shards over and whose gradients and loss totals are reduced together: data parallelism,
    times context parallelism when the mesh has it (its ranks see different positions of the same samples)."""
    if CONTEXT_PARALLEL in mesh.mesh_dim_names:
        # _flatten returns the mesh it made before (slicing a flattened dim off the root is deprecated).
        return mesh["data_parallel", CONTEXT_PARALLEL]._flatten("data_context_parallel")
    return mesh["data_parallel"]


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model whose gradients live on several device meshes.

    Sums of squares are taken per mesh (DTensor reduces them over that mesh's shards, one collective per
    mesh), then combined, so plain, FSDP-only and FSDP+TP parameters can sit in one model. Sums, not
    torch's norm kernel: on the CPU that kernel accumulates fp32 in sequence, losing digits on large
    gradients, where `sum` adds pairwise; otherwise the logged norm and the clipping depend on the sharding.
    """
    from torch.distributed.tensor import DTensor

    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    squares = []
    for group in by_mesh.values():
        mesh_squares = reduce(torch.add, [torch.sum(p.grad.square(), dtype=torch.float32) for p in group])
        squares.append(mesh_squares.full_tensor() if isinstance(mesh_squares, DTensor) else mesh_squares)
    total = reduce(torch.add, squares).sqrt()
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


ParameterInit = Callable[[str, torch.Tensor, torch.Generator], None]


@torch.no_grad()
def _init_layout_independent(
    model: nn.Module, seed: int, init: ParameterInit, select: Callable[[str], bool]
) -> None:
    """Each selected parameter drawn whole by `init`, in name order, from one seeded generator; each rank keeps
    its own slice, so any TP/DP layout starts from the weights an unsharded model gets (DTensor's own random
    ops repeat one shard's values on CPU)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if not select(name):
            continue
        full = torch.empty(param.shape, dtype=param.dtype)
        init(name, full, generator)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds the full tensor already, so slicing needs no communication.
            local = distribute_tensor(
                full, param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)


def init_weights(model: Mistral, seed: int) -> None:
    """Random initialisation of the model's own weights (not its adapters) that does not depend on the layout:
    exactly the weights `model.init_weights(generator)` gives an unsharded model."""
    _init_layout_independent(model, seed, model.init_parameter_, lambda name: not is_adapter_parameter(name))


def init_adapters(model: nn.Module, seed: int) -> None:
    """PEFT's initialisation of the LoRA adapters (A Kaiming-uniform, B zero), the same under any layout."""
    _init_layout_independent(model, seed, init_adapter_, is_adapter_parameter)
