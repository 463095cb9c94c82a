"""A training step's memory per device, simulated: the real model, plan and optimizer under FakeTensorMode.

Tensors under `FakeTensorMode` have shapes, dtypes and devices but no storage, so the whole 7B at 32K runs
its step on a small CPU machine in about a minute. A fake process group of the layout's world size stands
in for the other ranks: collectives return tensors of the right shapes without communicating, so this
process is rank 0 of the mesh, and every rank holds the same shapes (FSDP2 pads uneven shards). torch's
own trackers, `FSDPMemTracker` (for an FSDP2 model; `MemTracker` otherwise), follow every tensor storage
from its creation until it is freed, as a device allocator does, and keep the peak with what it was made of.

Two optimizer steps run, each over up to two accumulated micro-batches, because the peak is reached
only once gradients, AdamW's states and a micro-batch's activations are all alive (the states appear
at the first step), in the order of Lightning's loop: the gradients of the last step are zeroed after
the next forward pass, before its backward pass. What it predicts is the peak of allocated tensor memory
(`max_memory_allocated`); the runtime's own context and the caching allocator's free blocks come on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from mistral_lightning.adapters.lora import adapters_disabled
from mistral_lightning.adapters.nf4 import materialize_nf4_
from mistral_lightning.kernels.attention_dispatch import attention_path
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.model import Mistral
from mistral_lightning.training.parallel import clip_grad_norm_
from mistral_lightning.training.preference import ObjectiveConfig, pair_sums, preference_losses
from mistral_lightning.training.step_time import OperatorCosts, StepCost

# The fake tensors live on the CPU: fake CUDA tensors need a CUDA build (FSDP2 asks the device for streams).
DEVICE = torch.device("cpu")
# The trackers' categories, grouped into what a reader of a memory budget asks about.
CATEGORIES = {
    "parameters": ("Parameter", "Buffer", "Sharded Param", "Unsharded Param", "All Gather"),
    "gradients": ("Gradient", "Sharded Grad", "Unsharded Grad", "Reduce Scatter"),
    "optimizer_state": ("Optstate", "OptState"),
    "activations": ("Activation", "Temp", "Inputs", "Other"),
}


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one optimizer step of the training loop does: micro-batches of [micro_batch_size, seq_length]
    tokens, `micro_batches` of them accumulated, then gradient clipping (if any) and the AdamW step.
    `preference`: rows of DPO pairs (each half a side), the reference's forward without a graph before the
    policy's."""

    micro_batch_size: int
    seq_length: int
    micro_batches: int = 1
    gradient_clip_val: float | None = None
    loss_chunk_size: int = 1024
    preference: bool = False


@dataclasses.dataclass
class MemoryReport:
    """Bytes per device: the peak and what it was made of, and the steady state after an optimizer step."""

    peak_bytes: int
    at_peak: dict[str, int]  # CATEGORIES at the moment of the peak
    after_step: dict[str, int]  # CATEGORIES after the last optimizer step (gradients freed)
    tracker_categories: dict[str, int]  # the tracker's own categories at the peak
    attention_path: str
    seconds: float
    # One optimizer step's operators: every micro-batch (scaled from the simulated ones), then the update.
    step_cost: StepCost = dataclasses.field(default_factory=StepCost)


def _grouped(snapshot: dict[Any, int], outside_fsdp: int = 0) -> dict[str, int]:
    """CATEGORIES of a tracker snapshot; `outside_fsdp`: bytes of parameters FSDP2 leaves out (QLoRA's NF4
    base), tracked as inputs and alive throughout, so moved to the parameters."""
    named = {getattr(key, "value", key): value for key, value in snapshot.items()}
    grouped = {group: sum(named.get(name, 0) for name in names) for group, names in CATEGORIES.items()}
    grouped["parameters"] += outside_fsdp
    grouped["activations"] -= outside_fsdp
    return grouped


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's storage, or of a wrapper subclass's inner tensors (an NF4 weight's codes and scalers)."""
    if isinstance(tensor, DTensor):  # a frozen reference's shard
        return _tensor_bytes(tensor.to_local())
    if is_traceable_wrapper_subclass(tensor):
        return sum(_tensor_bytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return tensor.untyped_storage().nbytes()


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """Rank `rank` of a process group of `world_size` ranks whose collectives only produce shapes."""
    if dist.is_initialized():
        raise RuntimeError("the memory plan needs its own fake process group; a process group is already up")
    dist.init_process_group("fake", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _LabelledPositions(TorchDispatchMode):
    """`nonzero` of a fake tensor has no values to count; the loss asks it which positions carry a label, and this
    answers all of them, or all but one. Those are the fused loss's worst cases (kernels/cross_entropy.py):
    with every position labelled it uses the hidden states and their gradient in place; with any unlabelled one
    it copies the k labelled rows and their gradient and scatters that into a zeroed gradient of all N positions,
    about 2k hidden rows more, so the largest k short of N costs most, unless all N positions fit one chunk of
    logits, whose extra row may weigh more (measured in docs/training.md). `largest_mask`: the most positions
    asked about at once."""

    def __init__(self, all_but_one: bool) -> None:
        super().__init__()
        self.all_but_one = all_but_one
        self.largest_mask = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default:
            (mask,) = args
            self.largest_mask = max(self.largest_mask, mask.numel())
            rows = max(mask.numel() - 1, 0) if self.all_but_one else mask.numel()
            return torch.empty((rows, mask.dim()), dtype=torch.long, device=mask.device)
        return func(*args, **(kwargs or {}))


class _ShardingPropagationFlag:
    """Set while DTensor works out an operator's output layout. It does so by running the operator on
    global-shape fake tensors in the active fake mode, which is ours here, so a tracker would count those
    as this rank's memory; `ShardingPropagator._fake_mode_lock` is the context DTensor enters around it."""

    def __init__(self) -> None:
        self.depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc) -> None:
        self.depth -= 1


def _tracker(model: nn.Module, optimizer: torch.optim.Optimizer, propagating: _ShardingPropagationFlag):
    """FSDPMemTracker for an FSDP2 model (it names sharded/unsharded parameters and gradients), else
    MemTracker; either skips what DTensor's layout propagation allocates."""
    base = FSDPMemTracker if isinstance(model, FSDPModule) else MemTracker

    class Tracker(base):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if propagating.depth:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    if base is FSDPMemTracker:
        return Tracker(model, optimizer)
    tracker = Tracker()
    tracker.track_external(model, optimizer)
    return tracker


def _batch(shape: StepShape) -> dict[str, torch.Tensor]:
    """A batch as the DataModules deliver it: one document per sample, or for DPO one pair per row, its chosen
    side (document 0) in the first half and its rejected side (document 1) in the second."""
    size = (shape.micro_batch_size, shape.seq_length)
    batch = {
        "input_ids": torch.zeros(size, dtype=torch.long, device=DEVICE),
        "labels": torch.zeros(size, dtype=torch.long, device=DEVICE),
        "position_ids": torch.arange(shape.seq_length, device=DEVICE).expand(size),
    }
    if shape.preference:
        half = torch.arange(shape.seq_length, device=DEVICE) >= shape.seq_length // 2
        batch["document_ids"] = half.long().expand(size)
    return batch


def _preference_loss(
    policy: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    batch: dict[str, torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """The DPO step's loss as the module computes it: the reference's log-probabilities without a graph, then
    the policy's, summed per side and combined per pair."""
    documents = batch["document_ids"]
    with torch.no_grad():
        reference_sums = pair_sums(_plain(reference(**batch, chunk_size=chunk_size)), documents)
    tokens = _plain(policy(**batch, chunk_size=chunk_size))
    counts = pair_sums((batch["labels"] != IGNORE_INDEX).to(tokens.dtype), documents)
    terms = preference_losses(
        ObjectiveConfig(kind="dpo"), pair_sums(tokens, documents), reference_sums, counts
    )
    return terms.losses.sum()


def _plain(loss: torch.Tensor) -> torch.Tensor:
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def simulate_training_step(
    build: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    shape: StepShape,
    *,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    world_size: int = 1,
    rank: int = 0,
    steps: int = 2,
    lightning_order: bool = True,
    build_reference: Callable[[], nn.Module] | None = None,
) -> MemoryReport:
    """The peak memory of `steps` optimizer steps of `build()`'s model, simulated on one rank of `world_size`.

    build: returns a `Mistral` on the meta device with its parallel plan applied (or none); it runs with the
        fake process group up, so it can make a device mesh. make_optimizer: the optimizer over its parameters.
        forward_context: the precision plugin's autocast, entered around each forward pass.
        lightning_order: zero the gradients as Lightning's loop does, after the forward pass of an accumulation
        window's first micro-batch (so the last step's gradients are alive during it); False: after the
        optimizer step, as a plain loop does.
        build_reference: for a DPO step (`shape.preference`) of full fine-tuning, returns the frozen reference
            as `build` does the model; None: the reference is the model with its adapters switched off.
    The loss's labels are its most expensive ones: every position but one labelled, or (when all positions fit
    one chunk of logits) every position, whichever peaks higher.
    """
    start = time.perf_counter()
    simulate = partial(
        _simulate,
        build,
        make_optimizer,
        shape,
        forward_context,
        world_size,
        rank,
        steps,
        lightning_order,
        build_reference,
    )
    labelling = _LabelledPositions(all_but_one=True)
    report = simulate(labelling)
    if 0 < labelling.largest_mask <= shape.loss_chunk_size:
        # All positions in one chunk of logits: every one labelled adds a row of logits, which may outweigh the copies.
        report = max(report, simulate(_LabelledPositions(all_but_one=False)), key=lambda r: r.peak_bytes)
    return dataclasses.replace(report, seconds=time.perf_counter() - start)


def _simulate(
    build: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    shape: StepShape,
    forward_context: Callable[[], contextlib.AbstractContextManager],
    world_size: int,
    rank: int,
    steps: int,
    lightning_order: bool,
    build_reference: Callable[[], nn.Module] | None,
    labelling: _LabelledPositions,
) -> MemoryReport:
    """One simulation of simulate_training_step, the loss's labels answered by `labelling`."""
    propagating = _ShardingPropagationFlag()
    attention_paths: list[str] = []
    simulated_micro_batches = min(shape.micro_batches, 2)
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_process_group(world_size, rank))
        model = build()
        reference = None if build_reference is None or not shape.preference else build_reference()
        stack.callback(setattr, ShardingPropagator, "_fake_mode_lock", ShardingPropagator._fake_mode_lock)
        ShardingPropagator._fake_mode_lock = propagating
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(labelling)
        model.to_empty(device=DEVICE)
        materialize_nf4_(model)
        if reference is not None:
            reference.to_empty(device=DEVICE)
        optimizer = make_optimizer(model)
        batch = _batch(shape)
        attn = model.layers[0].attn
        attn.q.register_forward_hook(
            lambda module, args, q: attention_paths.append(
                attention_path(q.unflatten(-1, (-1, attn.head_dim)), attn.window)
            )
        )
        fsdp = isinstance(model, FSDPModule)
        step_method = Mistral.token_log_probs if shape.preference else Mistral.loss
        if fsdp:
            # FSDPMemTracker follows FSDP's forward hooks, which only `model(...)` runs: make the loss the forward.
            model.forward = partial(step_method, model)
        tracker = _tracker(model, optimizer, propagating)
        outside_fsdp = [p for p in model.parameters() if not isinstance(p, DTensor)] if fsdp else []
        # The frozen reference is alive throughout, outside the model and the optimizer the tracker follows.
        frozen = [] if reference is None else [*reference.parameters(), *reference.buffers()]
        if fsdp:
            # FSDPMemTracker tracks only what FSDP2 manages, and inputs: the parameters it leaves out go as those.
            tracker.track_inputs((*batch.values(), *outside_fsdp, *frozen))
        else:
            tracker.track_external(*batch.values(), *frozen)
        # Counted apart: the micro-batches' forward and backward passes, and the optimizer step's clipping and update.
        costs, optimizer_cost = OperatorCosts(skip=lambda: propagating.depth > 0), StepCost()
        loss_fn = model if fsdp else partial(step_method, model)
        if shape.preference:
            policy_fn = loss_fn
            if reference is not None:
                reference_fn = reference.token_log_probs
            else:

                def reference_fn(**inputs):
                    # The method, not `model(...)`: FSDPMemTracker counts one forward pass per backward.
                    with adapters_disabled(model):
                        return model.token_log_probs(**inputs)

            loss_fn = partial(_preference_loss, policy_fn, reference_fn)
        with tracker, costs, costs.functional_collectives():
            for _ in range(steps):
                for micro_batch in range(simulated_micro_batches):
                    with loss_parallel():
                        with forward_context():
                            loss = (
                                loss_fn(batch, shape.loss_chunk_size)
                                if shape.preference
                                else _plain(loss_fn(**batch, chunk_size=shape.loss_chunk_size))
                            )
                        if lightning_order and micro_batch == 0:
                            optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    del loss
                    # The trackers keep per-module statistics for one pass; only the global peak is read here.
                    tracker.reset_mod_stats()
                micro_batch_cost, costs.cost = costs.cost, optimizer_cost
                if shape.gradient_clip_val:
                    clip_grad_norm_(model.parameters(), shape.gradient_clip_val)
                optimizer.step()
                if not lightning_order:
                    optimizer.zero_grad(set_to_none=True)
                optimizer_cost, costs.cost = costs.cost, micro_batch_cost
            after_step = tracker.get_tracker_snapshot("current").get(DEVICE, {})
        peak = tracker.get_tracker_snapshot("peak").get(DEVICE, {})
    held = sum(_tensor_bytes(p) for p in (*outside_fsdp, *frozen))
    return MemoryReport(
        peak_bytes=int(peak.get("Total", 0)),
        at_peak=_grouped(peak, held),
        after_step=_grouped(after_step, held),
        tracker_categories={getattr(key, "value", key): int(value) for key, value in peak.items() if value},
        attention_path=attention_paths[0] if attention_paths else "none",
        seconds=0.0,
        step_cost=costs.cost.scaled(shape.micro_batches / (steps * simulated_micro_batches))
        + optimizer_cost.scaled(1 / steps),
    )
