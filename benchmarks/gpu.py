"""Single-device benchmark of the 7B at 32K on one CUDA GPU or Ascend NPU, with the depth and checkpointing the plan
chooses; under 5 minutes.

    python benchmarks/gpu.py                      # the plan's choice: most layers (up to 32), fastest mix that fits
    python benchmarks/gpu.py --activation-checkpointing selective   # every block selective, as deep as fits
    python benchmarks/gpu.py --layers 8 --activation-checkpointing none --steps 5
    python benchmarks/gpu.py --dry-run            # CPU, tiny shapes, a 0.12 GB "device": checks the logic only
    python benchmarks/gpu.py --plan-only "NVIDIA H200" --memory-gb 149   # what it would run there; no device

The model is the real `Mistral` with Mistral-7B's layer shape (hidden 4096, FFN 14336, 32/8 heads, head_dim
128, window 4096, vocab 32000), bf16 weights and AdamW states, batch 1. The memory plan (training/layouts.py)
runs first, on the host CPU and fake tensors: the most layers (up to 32) whose planned peak fits the device less
--headroom, with every block under the given policy, or, with "auto", every block fully checkpointed and then
the fastest mix of "none"/"selective" blocks that still fits, as `fit`'s `activation_checkpointing: auto`
chooses it. Reported, in the recipe's units: tokens/s per device, s/step, TFLOPs per device, MFU (model FLOPs as
RecipeThroughputMonitor counts them, peak from its table or --peak-tflops), peak memory, the plan's peak and
predicted s/step beside them (its calibration table named), and the tokens/s/p the whole 32-layer model would
reach at the same MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time

import torch

from mistral_lightning.callbacks import lookup_peak_tflops, training_flops_per_token
from mistral_lightning.config import MistralConfig
from mistral_lightning.devices import (
    accelerator_module,
    device_name,
    peak_memory,
    reset_peak_memory,
    synchronize,
)
from mistral_lightning.kernels import resolve_backend
from mistral_lightning.model import Mistral
from mistral_lightning.training.device_rates import device_table
from mistral_lightning.training.layouts import (
    TrainingLayout,
    predict_step_time,
    search_layouts,
    shared_simulations,
    simulate_layout,
)
from mistral_lightning.training.memory_plan import MemoryReport, StepShape
from mistral_lightning.training.optim import OptimizerConfig, build_optimizer
from mistral_lightning.training.parallel import (
    ParallelConfig,
    apply_activation_checkpointing,
    apply_compile,
    describe_policies,
    layer_policies,
)
from mistral_lightning.training.step_time import DeviceRates

POLICY_CHOICES = ("auto", "none", "selective", "full")
# The dry run's "device": the 4-layer tiny preset (bench_model) at seq 256 fits whole only with some blocks
# checkpointed.
DRY_RUN_MEMORY_GB = 0.1215


def pick_device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    try:
        importlib.import_module("torch_npu")  # registers torch.npu
        if torch.npu.is_available():
            return torch.device("npu", 0)
    except ImportError:
        pass
    raise SystemExit("no CUDA GPU or Ascend NPU found; use --dry-run to check the script on CPU")


def bench_layout(model: MistralConfig, seq: int, policies: str | list[str]) -> TrainingLayout:
    """What `train` runs, as the plan reads it: one device, bf16 weights and AdamW states, batch 1."""
    return TrainingLayout(
        model=model,
        data_parallel=1,
        tensor_parallel=1,
        precision="bf16-true",
        parallel=ParallelConfig(activation_checkpointing=policies),
        optimizer=OptimizerConfig(),
        step=StepShape(micro_batch_size=1, seq_length=seq),
    )


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    layers: int
    policies: list[str]
    planned_peak_bytes: int
    predicted_s_per_step: float
    rates: DeviceRates

    def summary(self) -> dict:
        return {
            "layers": self.layers,
            "activation_checkpointing": describe_policies(self.policies),
            "planned_peak_memory_bytes": self.planned_peak_bytes,
            "predicted_s_per_step": self.predicted_s_per_step,
            "calibration_table": self.rates.name,
        }


def deepest_that_fits(
    full: MistralConfig, seq: int, policy: str, budget_bytes: float
) -> tuple[int, MemoryReport]:
    """The most layers (up to the model's) whose planned peak with every block under `policy` fits the budget.

    The peak grows with depth, but not in proportion (the loss's logits weigh most in a shallow model), so each
    next depth planned is where the line through the last two plans meets the budget, kept between the deepest
    depth known to fit and the shallowest known not to, until they are one apart.
    """
    plans: dict[int, MemoryReport] = {}

    def peak(layers: int) -> int:
        if layers not in plans:
            plans[layers] = simulate_layout(bench_layout(full.replace(num_layers=layers), seq, policy))
        return plans[layers].peak_bytes

    if peak(1) > budget_bytes:
        raise SystemExit(
            f"even one {policy} layer plans {peak(1) / 1e9:.1f} GB, over the {budget_bytes / 1e9:.1f} GB "
            "budget: lower --seq"
        )
    fitting, over = 1, full.num_layers + 1
    previous, depth = 1, 2
    while over - fitting > 1:
        if peak(depth) <= budget_bytes:
            fitting = depth
        else:
            over = depth
        if over - fitting <= 1:
            break
        slope = (peak(depth) - peak(previous)) / (depth - previous)
        guess = depth + (budget_bytes - peak(depth)) / slope if slope > 0 else (fitting + over) / 2
        previous, depth = depth, min(max(int(guess), fitting + 1), over - 1)
    return fitting, plans[fitting]


def plan_run(
    full: MistralConfig,
    seq: int,
    policy: str,
    layers: int | None,
    capacity_bytes: float,
    headroom: float,
    table: dict[int, DeviceRates],
) -> PlannedRun:
    """The run's depth (unless given) and per-block policies, with the plan's peak and predicted step time."""
    budget = capacity_bytes * (1 - headroom)
    lightest = "full" if policy == "auto" else policy
    # Shared: the layout the depth search ends on is the one planned below and the one the mix search starts from.
    with shared_simulations():
        if layers is None:
            layers = deepest_that_fits(full, seq, lightest, budget)[0]
        layout = bench_layout(full.replace(num_layers=layers), seq, lightest)
        report = simulate_layout(layout)
        if policy == "auto":
            # As fit's auto: the fastest mix of lighter blocks whose peak fits, simulated as it is.
            chosen = search_layouts(layout, capacity_bytes, table, headroom, layouts=[layout])
            if chosen:
                best = chosen[0]
                return PlannedRun(
                    layers,
                    list(best.layout.parallel.activation_checkpointing),
                    int(best.peak_bytes),
                    best.prediction.seconds,
                    best.prediction.rates,
                )
    prediction = predict_step_time(layout, report, table)
    policies = layer_policies(lightest, layers)
    return PlannedRun(layers, policies, report.peak_bytes, prediction.seconds, prediction.rates)


def train(
    config: MistralConfig,
    policies: list[str],
    seq: int,
    device: torch.device,
    steps: int,
    compile_blocks: bool = False,
) -> dict:
    """Build, then run `steps` optimizer steps after one warm-up step; timings and peak memory."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Mistral(config).to(torch.bfloat16)
    model.to_empty(device=device)
    model.init_weights()
    apply_activation_checkpointing(model, policies)
    if compile_blocks:
        apply_compile(model)
    optimizer = build_optimizer(model, OptimizerConfig())
    tokens = torch.randint(3, config.vocab_size, (1, seq + 1), device=device)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]
    reset_peak_memory(device)
    start = 0.0
    for step in range(steps + 1):
        model.loss(input_ids, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step == 0:
            start = time.perf_counter()
    seconds = (time.perf_counter() - start) / steps if steps else float("nan")
    peak = peak_memory(device).get("peak_allocated", 0)
    backend = resolve_backend(input_ids)
    del model, optimizer
    if device.type != "cpu":
        accelerator_module(device).empty_cache()
    return {"s_per_step": seconds, "peak_memory_bytes": peak, "attention_backend": backend}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=None, help="default: the most the plan fits (up to 32)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps, after one warm-up step")
    parser.add_argument(
        "--activation-checkpointing",
        default="auto",
        choices=POLICY_CHOICES,
        help="auto: the plan's fastest mix of full with none/selective blocks that fits; else every block",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each block, as model.parallel.compile"
    )
    parser.add_argument("--memory-gb", type=float, default=None, help="default: the device's memory")
    parser.add_argument(
        "--headroom", type=float, default=0.1, help="share of the memory the plan leaves free"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by device name")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument(
        "--plan-only",
        metavar="CARD",
        default=None,
        help='print what the plan would run on this card (e.g. "NVIDIA H200", with --memory-gb) and stop; no '
        "device needed",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, 4 tiny layers, seq 256, a 0.12 GB device"
    )
    return parser


def measure(
    full: MistralConfig,
    planned: PlannedRun,
    seq: int,
    device: torch.device,
    steps: int,
    compile_blocks: bool,
    peak_tflops: float | None,
) -> dict:
    """Train the planned run on the device; the report, in the recipe's units, with the plan beside it."""
    config = full.replace(num_layers=planned.layers)
    result = train(config, planned.policies, seq, device, steps, compile_blocks)
    tokens_per_s = seq / result["s_per_step"]
    flops_per_s = tokens_per_s * training_flops_per_token(config, seq)
    mfu = flops_per_s / (peak_tflops * 1e12) if peak_tflops else None
    return {
        **planned.summary(),
        "seq_length": seq,
        "window": config.sliding_window,
        "compiled": compile_blocks,
        **result,
        "predicted_over_measured": planned.predicted_s_per_step / result["s_per_step"],
        "tokens_per_sec_per_device": tokens_per_s,
        "tflops_per_device": flops_per_s / 1e12,
        "peak_tflops": peak_tflops,
        "mfu": mfu,
        # At equal MFU, tokens/s scale inversely with FLOPs per token.
        "full_model_tokens_per_sec_per_device_estimate": mfu
        * peak_tflops
        * 1e12
        / training_flops_per_token(full, seq)
        if mfu
        else None,
    }


def bench_model(dry_run: bool, seq: int) -> MistralConfig:
    """The 7B's shape; in a dry run, the tiny preset at 4 layers (its plans take about a second each)."""
    if dry_run:
        return MistralConfig.from_name("tiny", num_layers=4)
    return MistralConfig.from_name("mistral-7b-32k", max_seq_length=max(32768, seq))


def device_memory(device: torch.device, memory_gb: float | None) -> float:
    if memory_gb is not None:
        return memory_gb * 1e9
    return accelerator_module(device).get_device_properties(device).total_memory


def plan_only(args: argparse.Namespace) -> dict:
    """What a run on the named card would train, from the plan alone (no device)."""
    accelerator = "npu" if "ascend" in args.plan_only.lower() else "cuda"
    capacity = args.memory_gb * 1e9
    planned = plan_run(
        bench_model(False, args.seq),
        args.seq,
        args.activation_checkpointing,
        args.layers,
        capacity,
        args.headroom,
        device_table(accelerator, args.plan_only),
    )
    return {
        "device": args.plan_only,
        "device_memory_bytes": int(capacity),
        "asked": args.activation_checkpointing,
        "seq_length": args.seq,
        **planned.summary(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plan_only:
        if args.memory_gb is None:
            parser.error("--plan-only needs --memory-gb (the card's memory in GB)")
        return write_report(plan_only(args), args.out)
    device = pick_device(args.dry_run)
    if args.dry_run:
        args.seq, args.steps = min(args.seq, 256), min(args.steps, 2)
        args.memory_gb = args.memory_gb or DRY_RUN_MEMORY_GB
    full = bench_model(args.dry_run, args.seq)
    name = "CPU (dry run)" if args.dry_run else device_name(device)
    capacity = device_memory(device, args.memory_gb)
    table = device_table(device.type, name)
    planned = plan_run(
        full, args.seq, args.activation_checkpointing, args.layers, capacity, args.headroom, table
    )
    peak_tflops = args.peak_tflops or lookup_peak_tflops(name)
    report = {
        "device": name,
        "device_memory_bytes": int(capacity),
        "asked": args.activation_checkpointing,
        **measure(full, planned, args.seq, device, args.steps, args.compile, peak_tflops),
    }
    return write_report(report, args.out)


def write_report(report: dict, out: str | None) -> dict:
    print(json.dumps(report, indent=2))
    if out:
        with open(out, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
