"""A training layout (model, mesh sizes, precision, checkpointing, batch shape) simulated, priced and searched.

`simulate_layout` builds the model as `MistralLightningModule.configure_model` does and runs its step under the
memory plan (training/memory_plan.py); `predict_step_time` prices the step with a calibration table
(training/step_time.py). `search_layouts` enumerates the layouts of a device count (tensor x data parallel sizes,
micro-batch sizes that keep the global batch, and per-block checkpointing mixes: k blocks "none" or
"selective", the rest "full"), keeps those whose peak fits the device with a headroom, and ranks them by
predicted tokens/s per device. A mix is priced from three simulations of its layout (every block "none",
"selective", "full"): each block adds its policy's share of memory and work, so a mix of k lighter blocks lies
k / L of the way from "full"; the chosen one is then simulated as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import json
from collections.abc import Iterator
from functools import partial

import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

from mistral_lightning.adapters.lora import LoRAConfig
from mistral_lightning.adapters.nf4 import check_quantize_base
from mistral_lightning.config import MistralConfig
from mistral_lightning.errors import UserError
from mistral_lightning.model import Mistral
from mistral_lightning.training.device_rates import rates_for
from mistral_lightning.training.memory_plan import MemoryReport, StepShape, simulate_training_step
from mistral_lightning.training.optim import OptimizerConfig, build_optimizer
from mistral_lightning.training.parallel import (
    ParallelConfig,
    build_device_mesh,
    mixed_precision_policy,
    parallelize,
)
from mistral_lightning.training.preference import ObjectiveConfig
from mistral_lightning.training.step_time import DeviceRates, StepCost


@dataclasses.dataclass(frozen=True)
class TrainingLayout:
    """What the plan simulates, read from a `fit` config."""

    model: MistralConfig
    data_parallel: int
    tensor_parallel: int
    precision: str
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    step: StepShape
    lora: LoRAConfig | None = None
    context_parallel: int = 1
    objective: ObjectiveConfig = ObjectiveConfig()

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.context_parallel * self.tensor_parallel


def precision_plugin(precision: str) -> Precision:
    """The plugin Lightning's Trainer uses for `precision`, with autocast on the CPU the simulation runs on."""
    if precision in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(precision, device="cpu")
    if precision in ("bf16-true", "16-true"):
        return HalfPrecision(precision)
    return Precision()


def simulated_context_rank(context_parallel: int) -> int:
    """The context index the plan simulates: one that receives the largest halo and, with CP > 2, sends one."""
    return 0 if context_parallel == 1 else max(1, context_parallel - 2)


def simulated_rank(layout: TrainingLayout) -> int:
    """That context index's first global rank, in the mesh order (data, context, tensor)."""
    return simulated_context_rank(layout.context_parallel) * layout.tensor_parallel


# The reports of the innermost `shared_simulations` block, by layout (as JSON); None outside one.
_shared_reports: contextvars.ContextVar[dict[str, MemoryReport] | None] = contextvars.ContextVar(
    "shared_reports", default=None
)


@contextlib.contextmanager
def shared_simulations() -> Iterator[None]:
    """Inside the block each layout is simulated once however often it is asked for (a search prices uniform
    layouts and then simulates its winner, often one of them). Scoped to the block, so no report outlives the
    kernel choices it was made under; a nested block shares the outer one's reports."""
    if _shared_reports.get() is not None:
        yield
        return
    token = _shared_reports.set({})
    try:
        yield
    finally:
        _shared_reports.reset(token)


def simulate_layout(layout: TrainingLayout) -> MemoryReport:
    """Simulate one rank of `layout`: the model built as `MistralLightningModule.configure_model` builds it."""
    shared = _shared_reports.get()
    if shared is None:
        return _simulate_layout(layout)
    key = layout_to_json(layout)
    if key not in shared:
        shared[key] = _simulate_layout(layout)
    return shared[key]


def _simulate_layout(layout: TrainingLayout) -> MemoryReport:
    plugin = precision_plugin(layout.precision)
    check_quantize_base(layout.lora, layout.tensor_parallel)

    context = layout.context_parallel
    # Under context parallelism a rank runs its shard of each sequence. The rank simulated both receives the
    # largest halo and sends its own (the next-to-last context rank; the last one with CP2): the most memory.
    step = dataclasses.replace(layout.step, seq_length=layout.step.seq_length // context)

    def build(lora: LoRAConfig | None, activation_checkpointing: str) -> Mistral:
        mesh = build_device_mesh("cpu", layout.data_parallel, context, layout.tensor_parallel)
        with plugin.module_init_context(), torch.device("meta"):
            model = Mistral(layout.model)
        # Eager: compiled blocks need a compiler run per shape, which a fake tensor cannot drive.
        return parallelize(
            model,
            mesh,
            sequence_parallel=layout.parallel.sequence_parallel,
            activation_checkpointing=activation_checkpointing,
            mp_policy=mixed_precision_policy(layout.precision),
            seq_length=step.seq_length,
            lora=lora,
        )

    def build_reference() -> Mistral:
        # As MistralLightningModule.configure_model builds DPO's frozen copy for full fine-tuning.
        return build(None, "none").requires_grad_(False)

    preference = layout.objective.is_preference
    return simulate_training_step(
        partial(build, layout.lora, layout.parallel.activation_checkpointing),
        lambda model: build_optimizer(model, layout.optimizer),
        dataclasses.replace(step, preference=preference),
        forward_context=plugin.forward_context,
        world_size=layout.world_size,
        rank=simulated_rank(layout),
        build_reference=build_reference if preference and layout.lora is None else None,
    )


@dataclasses.dataclass(frozen=True)
class StepTimePrediction:
    """The predicted time of one optimizer step, and the tokens per second each device then trains."""

    seconds: float
    tokens_per_second_per_device: float
    rates: DeviceRates


def predict_step_time(
    layout: TrainingLayout, report: MemoryReport, table: dict[int, DeviceRates]
) -> StepTimePrediction:
    """The simulated step's operators at the rates of `table`'s row for this many processes (on a CPU they share
    the machine; a GPU or NPU table has one row, one process per device)."""
    rates = rates_for(table, layout.world_size)
    seconds = rates.seconds(report.step_cost)
    step = layout.step
    tokens = step.micro_batch_size * step.seq_length * step.micro_batches * layout.data_parallel
    return StepTimePrediction(seconds, tokens / layout.world_size / seconds, rates)


# ---------------------------------------------------------------------------------------------- search
@dataclasses.dataclass(frozen=True)
class Candidate:
    """A layout the search priced: its peak per device and predicted step (exact when `simulated`, else
    interpolated between its layout's all-none/selective and all-full simulations)."""

    layout: TrainingLayout
    peak_bytes: float
    prediction: StepTimePrediction
    simulated: bool = False


def checkpoint_mixes(num_layers: int) -> list[list[str]]:
    """Every mix of k blocks "none" or "selective" (the first k) and the rest "full", k = 0..L, each once."""
    mixes = [["full"] * num_layers]
    for lighter, k in itertools.product(("none", "selective"), range(1, num_layers + 1)):
        mixes.append([lighter] * k + ["full"] * (num_layers - k))
    return mixes


def mesh_layouts(base: TrainingLayout, max_micro_batch: int = 8) -> list[TrainingLayout]:
    """The layouts of `base`'s devices and global batch: each tensor-parallel size the model divides by (with its
    data-parallel size; context parallelism as in `base`), and each micro-batch size that keeps the global batch."""
    devices = base.world_size // base.context_parallel
    global_batch = base.step.micro_batch_size * base.step.micro_batches * base.data_parallel
    layouts = []
    for tensor in (size for size in range(1, devices + 1) if devices % size == 0):
        model = base.model
        if model.num_kv_heads % tensor or model.vocab_size % tensor:
            continue
        data = devices // tensor
        if global_batch % data:
            continue
        for micro in (size for size in range(1, min(global_batch // data, max_micro_batch) + 1)):
            if (global_batch // data) % micro:
                continue
            step = dataclasses.replace(
                base.step, micro_batch_size=micro, micro_batches=global_batch // data // micro
            )
            layouts.append(dataclasses.replace(base, data_parallel=data, tensor_parallel=tensor, step=step))
    return layouts


def _with_policies(layout: TrainingLayout, policies) -> TrainingLayout:
    return dataclasses.replace(
        layout, parallel=dataclasses.replace(layout.parallel, activation_checkpointing=policies)
    )


def _interpolated(full: MemoryReport, lighter: MemoryReport, fraction: float) -> tuple[float, StepCost]:
    peak = full.peak_bytes + fraction * (lighter.peak_bytes - full.peak_bytes)
    return peak, full.step_cost.scaled(1 - fraction) + lighter.step_cost.scaled(fraction)


def price_mixes(layout: TrainingLayout, table: dict[int, DeviceRates]) -> list[Candidate]:
    """Every checkpointing mix of `layout`, priced from its three uniform simulations."""
    reports = {
        policy: simulate_layout(_with_policies(layout, policy)) for policy in ("none", "selective", "full")
    }
    layers = layout.model.num_layers
    candidates = []
    for mix in checkpoint_mixes(layers):
        # The first block carries the lighter policy of the mix, if it has one; k of L such blocks.
        lighter = mix[0]
        fraction = 0.0 if lighter == "full" else mix.count(lighter) / layers
        peak, cost = _interpolated(reports["full"], reports[lighter], fraction)
        priced = _with_policies(layout, mix)
        report = dataclasses.replace(reports["full"], peak_bytes=int(peak), step_cost=cost)
        candidates.append(Candidate(priced, peak, predict_step_time(priced, report, table)))
    return candidates


def search_layouts(
    base: TrainingLayout,
    capacity_bytes: float,
    table: dict[int, DeviceRates],
    headroom: float = 0.1,
    layouts: list[TrainingLayout] | None = None,
) -> list[Candidate]:
    """The layouts (of `layouts`, default every mesh layout of `base`) that fit `capacity_bytes` less `headroom`,
    fastest (predicted tokens/s per device) first; the first is simulated as it is and kept only if it fits."""
    budget = capacity_bytes * (1 - headroom)
    priced = []
    # Shared: the winner, simulated as it is below, is often a uniform layout price_mixes simulated.
    with shared_simulations():
        for layout in layouts or mesh_layouts(base):
            try:
                priced += price_mixes(layout, table)
            except UserError:  # a layout this model or LoRA setting cannot take (e.g. QLoRA under TP)
                continue
        ranked = sorted(
            (c for c in priced if c.peak_bytes <= budget),
            key=lambda c: -c.prediction.tokens_per_second_per_device,
        )
        for index, candidate in enumerate(ranked):
            report = simulate_layout(candidate.layout)
            if report.peak_bytes <= budget:
                exact = Candidate(
                    candidate.layout,
                    report.peak_bytes,
                    predict_step_time(candidate.layout, report, table),
                    True,
                )
                return [exact, *ranked[index + 1 :]]
    return []


def layout_to_json(layout: TrainingLayout) -> str:
    return json.dumps(dataclasses.asdict(layout))


def _tuples(fields: dict) -> dict:
    """JSON's lists back as the tuples a settings dataclass holds (AdamW's betas, LoRA's targets)."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()}


def layout_from_json(text: str) -> TrainingLayout:
    fields = json.loads(text)
    return TrainingLayout(
        model=MistralConfig(**fields["model"]),
        data_parallel=fields["data_parallel"],
        tensor_parallel=fields["tensor_parallel"],
        context_parallel=fields["context_parallel"],
        precision=fields["precision"],
        parallel=ParallelConfig(**fields["parallel"]),
        optimizer=OptimizerConfig(**_tuples(fields["optimizer"])),
        step=StepShape(**fields["step"]),
        lora=None if fields["lora"] is None else LoRAConfig(**_tuples(fields["lora"])),
        objective=ObjectiveConfig(**fields["objective"]),
    )
