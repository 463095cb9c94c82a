"""`mistral-lightning plan --config CONFIG.yaml`: what a training config needs per device, before renting one.

The config is read by the same LightningCLI parser as `fit` (so `--trainer.strategy.init_args.*` and any
other override work), but nothing is instantiated and no weights are read: the model, its parallel plan
and AdamW are built from the config's settings and one training step is simulated under FakeTensorMode
on a fake process group of the config's world size (`training/memory_plan.py`). Printed per rank: parameters,
gradients, optimizer state, activations and the peak, against the device's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.strategies import ModelParallelStrategy

from mistral_lightning.adapters.lora import LoRAConfig
from mistral_lightning.cli.configs import resolve_config_argv
from mistral_lightning.cli.fit import MistralCLI
from mistral_lightning.cli.plan_search import (
    check_config_target,
    chosen_config,
    format_search,
    nothing_fits,
    write_chosen_config,
)
from mistral_lightning.config import MistralConfig, resolve_model_config
from mistral_lightning.devices import total_memory
from mistral_lightning.errors import UserError
from mistral_lightning.outputs import FileKind, OutputTarget, check_output_file, user_path, write_output_file
from mistral_lightning.training.auto_checkpointing import choose as choose_checkpointing
from mistral_lightning.training.device_rates import DEFAULT_TABLES, calibrate_table, load_table, shipped_table
from mistral_lightning.training.layouts import (
    StepTimePrediction,
    TrainingLayout,
    predict_step_time,
    search_layouts,
    simulate_layout,
    simulated_context_rank,
)
from mistral_lightning.training.memory_plan import MemoryReport, StepShape
from mistral_lightning.training.module import MistralLightningModule
from mistral_lightning.training.optim import OptimizerConfig
from mistral_lightning.training.parallel import (
    ParallelConfig,
    describe_policies,
    layer_policies,
)
from mistral_lightning.training.preference import ObjectiveConfig

USAGE = (
    "usage: mistral-lightning plan --config CONFIG.yaml [--device_memory_gb GB] [--device_rates TABLE] "
    "[--plan_output FILE.json [--plan_overwrite true]] [any fit override, e.g. "
    "--trainer.strategy.init_args.tensor_parallel_size 4]\n"
    "       mistral-lightning plan calibrate [--out TABLE.yaml]"
)
# An earlier --plan_output starts as written below; --plan_overwrite replaces only such a file.
PLAN_JSON = FileKind("memory plan written by plan", lambda head: head.startswith(b'{\n  "layout": '))
DEVICE_TABLE = FileKind(
    "calibration table written by plan calibrate", lambda head: head.startswith(b"name: ")
)
# Memory of the card each accelerator usually means, when --device_memory_gb is not given (decimal GB).
DEFAULT_DEVICE_MEMORY_GB = {"npu": ("Ascend 910B", 64.0), "cuda": ("H100", 80.0), "gpu": ("H100", 80.0)}
# Lightning's spellings of trainer.precision, as its accelerator connector unifies them.
PRECISIONS = {
    "32": "32-true",
    "32-true": "32-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16-true": "bf16-true",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "16-true": "16-true",
}


# ---------------------------------------------------------------------------------------------- config
class _PlanCLI(MistralCLI):
    """The `fit` parser, with the plan's own options; nothing is instantiated."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--device_memory_gb",
            type=float | None,
            default=None,
            help="memory of one device in GB, to compare the peak with (default: by trainer.accelerator: "
            + ", ".join(f"{acc} {name} {gb:g}" for acc, (name, gb) in DEFAULT_DEVICE_MEMORY_GB.items())
            + ", cpu this machine's RAM)",
        )
        parser.add_argument(
            "--device_rates",
            type=str | None,
            default=None,
            help="calibration table for the predicted step time: a file `plan calibrate` wrote, or a shipped one "
            "(default: by trainer.accelerator: "
            + ", ".join(f"{acc} {name}" for acc, name in DEFAULT_TABLES.items())
            + "; none for npu)",
        )
        parser.add_argument(
            "--plan_output", type=str | None, default=None, help="also write the plan as JSON here"
        )
        parser.add_argument(
            "--search",
            type=bool,
            default=False,
            help="rank the layouts of these devices (TP x DP sizes, micro-batch sizes that keep the global batch, "
            "per-block checkpointing mixes) that fit, by predicted tokens/s per device",
        )
        parser.add_argument(
            "--search_headroom", type=float, default=0.1, help="share of device memory --search leaves free"
        )
        parser.add_argument(
            "--write_config",
            type=str | None,
            default=None,
            help="with --search: write the fastest as a fit config",
        )
        parser.add_argument(
            "--plan_overwrite",
            type=bool,
            default=False,
            help="replace a --plan_output file that holds an earlier plan (and nothing else)",
        )

    def instantiate_classes(self) -> None:
        pass  # the plan reads the settings only: no Trainer, no DataModule, no weights


def _count(value, option: str) -> int:
    if isinstance(value, (list, tuple)):
        return len(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{option}={value!r}: the plan needs a number of devices; set it (e.g. 8)") from None


def _strategy_sizes(trainer, devices: int, num_nodes: int) -> tuple[int, int, int]:
    strategy = trainer.strategy
    class_path = getattr(strategy, "class_path", None)
    if class_path is None:
        raise UserError(
            f"trainer.strategy={strategy!r}: the plan simulates ModelParallelStrategy layouts; set trainer.strategy "
            "to lightning.pytorch.strategies.ModelParallelStrategy or mistral_lightning.training.strategy.DeviceModelParallelStrategy"
        )
    module_name, _, name = class_path.rpartition(".")
    if not issubclass(getattr(importlib.import_module(module_name), name), ModelParallelStrategy):
        raise UserError(
            f"trainer.strategy {class_path} is not a ModelParallelStrategy; the plan simulates those only"
        )
    init_args = getattr(strategy, "init_args", None) or {}
    dp, tp = init_args.get("data_parallel_size", "auto"), init_args.get("tensor_parallel_size", "auto")
    cp = int(init_args.get("context_parallel_size", 1))
    # Lightning's defaults: data parallel across nodes, tensor parallel across a node's devices.
    dp = num_nodes if dp == "auto" else int(dp)
    tp = devices // cp if tp == "auto" else int(tp)
    if dp * cp * tp != devices * num_nodes:
        raise UserError(
            f"trainer.strategy.init_args: data_parallel_size={dp} x context_parallel_size={cp} x "
            f"tensor_parallel_size={tp} must equal trainer.devices x trainer.num_nodes = {devices} x {num_nodes}; "
            "change one of them"
        )
    return dp, cp, tp


def _model_config(model_args) -> MistralConfig:
    pretrained = model_args.get("pretrained")
    # The plan needs shapes only; the weights' folder is read (its config.json) where it exists.
    if pretrained and not Path(pretrained, "config.json").is_file():
        if model_args.get("model_config") is None:
            raise UserError(
                f"model.pretrained={pretrained} has no config.json and model.model_config is not set; "
                "give a preset name (e.g. --model.model_config mistral-7b-32k) so the plan knows the shapes"
            )
        pretrained = None
    model_config = model_args.get("model_config")
    if hasattr(model_config, "as_dict"):
        model_config = model_config.as_dict()
    return resolve_model_config(model_config, pretrained)


def _as_dict(value) -> dict:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value or {})


def layout_from_config(config) -> TrainingLayout:
    """The TrainingLayout of a parsed `fit` config (a jsonargparse Namespace)."""
    trainer, model_args = config.trainer, config.model
    data_args = _as_dict(getattr(config.data, "init_args", None))
    missing = [key for key in ("seq_length", "micro_batch_size") if key not in data_args]
    if missing:
        raise UserError(
            f"data.init_args has no {' or '.join(missing)}; the plan needs the batch shape "
            "(use PretrainDataModule or InstructionDataModule, or pass --data.init_args.seq_length ...)"
        )
    devices = _count(trainer.devices, "trainer.devices")
    num_nodes = _count(trainer.num_nodes or 1, "trainer.num_nodes")
    dp, cp, tp = _strategy_sizes(trainer, devices, num_nodes)
    precision = PRECISIONS.get(str(trainer.precision or "32-true"))
    if precision is None:
        raise UserError(
            f"trainer.precision={trainer.precision!r} is not one of {', '.join(sorted(set(PRECISIONS)))}"
        )
    return TrainingLayout(
        model=_model_config(model_args),
        data_parallel=dp,
        tensor_parallel=tp,
        context_parallel=cp,
        precision=precision,
        parallel=ParallelConfig(**_as_dict(model_args.get("parallel"))),
        optimizer=OptimizerConfig(**_as_dict(model_args.get("optimizer"))),
        # model.lora as fit reads it: the settings, as written, to LoRAConfig's own parsing ("all-linear" too).
        lora=None if model_args.get("lora") is None else LoRAConfig(**_as_dict(model_args.get("lora"))),
        objective=ObjectiveConfig(**_as_dict(model_args.get("objective"))),
        step=StepShape(
            micro_batch_size=int(data_args["micro_batch_size"]),
            seq_length=int(data_args["seq_length"]),
            micro_batches=int(trainer.accumulate_grad_batches or 1),
            gradient_clip_val=trainer.gradient_clip_val,
            loss_chunk_size=int(model_args.get("loss_chunk_size") or 1024),
        ),
    )


def _device_memory(accelerator: str, given_gb: float | None) -> tuple[str, float | None]:
    if given_gb is not None:
        return "one device", given_gb
    if accelerator in DEFAULT_DEVICE_MEMORY_GB:
        return DEFAULT_DEVICE_MEMORY_GB[accelerator]
    if accelerator == "cpu":
        return "this machine's RAM", total_memory(torch.device("cpu")) / 1e9
    return accelerator, None


# ---------------------------------------------------------------------------------------------- report
ROW_NAMES = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations and temporaries",
}


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def _describe_training(lora: LoRAConfig | None, objective: ObjectiveConfig) -> str:
    if lora is None:
        what = "full fine-tuning: every weight trained"
    else:
        base = "4-bit NF4 (torchao)" if lora.quantize_base == "nf4" else "dense, frozen"
        what = f"LoRA rank {lora.rank} on {', '.join(lora.targets)}; base weights {base}; AdamW over the adapters only"
    if not objective.is_preference:
        return what
    reference = "a frozen copy of the model" if lora is None else "the model with its adapters off"
    return (
        f"{what}; DPO: each row one pair (chosen, then rejected), the reference ({reference}) run without a graph "
        "before the policy"
    )


def format_report(
    layout: TrainingLayout,
    report: MemoryReport,
    device: tuple[str, float | None],
    source: str,
    prediction: StepTimePrediction | None = None,
) -> str:
    model, step = layout.model, layout.step
    count = model.num_params
    params = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
    lines = [
        f"memory plan of {source}: Mistral-{params} on {layout.world_size} ranks (data_parallel "
        f"{layout.data_parallel} x context_parallel {layout.context_parallel} x tensor_parallel "
        f"{layout.tensor_parallel}), seq {step.seq_length}"
        + (
            f" ({step.seq_length // layout.context_parallel} per rank; simulated: context rank "
            f"{simulated_context_rank(layout.context_parallel)}, which receives the largest halo)"
            if layout.context_parallel > 1
            else ""
        )
        + ", micro-batch "
        f"{step.micro_batch_size} x {step.micro_batches} accumulated, {layout.precision}, activation checkpointing "
        f"{describe_policies(layer_policies(layout.parallel.activation_checkpointing, model.num_layers))}, sequence parallel {layout.parallel.sequence_parallel}",
        _describe_training(layout.lora, layout.objective),
        f"simulated in {report.seconds:.0f} s under FakeTensorMode on a fake process group; attention path "
        f"{report.attention_path}; blocks eager (compiled ones peak lower); every position labelled",
        "",
        "per rank (all ranks hold the same shapes) | after an optimizer step | at the peak",
        "--- | --- | ---",
    ]
    lines += [
        f"{label} | {_size(report.after_step[key])} | {_size(report.at_peak[key])}"
        for key, label in ROW_NAMES.items()
    ]
    lines.append(f"**peak allocated** | | **{_size(report.peak_bytes)}**")
    name, capacity_gb = device
    if capacity_gb:
        headroom = capacity_gb - report.peak_bytes / 1e9
        verdict = "fits" if headroom > 0 else "does NOT fit"
        lines.append(
            f"{name}, {capacity_gb:.1f} GB | | {verdict}: {headroom:+.2f} GB left for the runtime and the "
            "allocator's cache"
        )
    if prediction is None:
        lines.append("predicted step time: no calibration table for this accelerator (--device_rates TABLE)")
    else:
        cost = report.step_cost
        lines.append(
            f"predicted step time {prediction.seconds:.3g} s, {prediction.tokens_per_second_per_device:,.0f} tokens/s "
            f"per device ({cost.matmul_flops / 1e12:.3g} TFLOP of matmuls, {cost.operators:,.0f} operators, "
            f"{cost.collectives:,.0f} collectives per step; rates: {prediction.rates.name}, "
            f"{prediction.rates.source})"
        )
    return "\n".join(lines)


def _parse(argv: list[str]) -> _PlanCLI:
    # The dispatcher hands over its own argv; Lightning would warn that sys.argv differs.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return _PlanCLI(
        MistralLightningModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        run=False,
        args=resolve_config_argv(argv),  # --config mistral-7b-32k/finetune_tp8: a shipped config
        seed_everything_default=False,
    )


def parse_config(argv: list[str]):
    """A `fit` command line (--config ... and overrides) parsed by the `fit` parser, as a jsonargparse Namespace."""
    return _parse(argv).config


def search(
    cli: _PlanCLI, layout: TrainingLayout, device: tuple[str, float | None], table, source: str
) -> int:
    """`plan --search`: the fitting layouts, fastest first; `--write_config`: the first as a fit config."""
    config = cli.config
    name, capacity_gb = device
    if capacity_gb is None:
        raise UserError(f"plan --search needs the memory of a device ({name}): pass --device_memory_gb GB")
    if table is None:
        raise UserError(
            "plan --search needs a calibration table for this accelerator: pass --device_rates TABLE"
        )
    headroom = float(config.search_headroom)
    if config.get("write_config"):
        check_config_target(config.write_config, bool(config.get("plan_overwrite")))
    candidates = search_layouts(layout, capacity_gb * 1e9, table, headroom)
    if not candidates:
        raise nothing_fits(capacity_gb, headroom)
    print(format_search(candidates, capacity_gb, headroom))
    if config.get("write_config"):
        text = chosen_config(cli.parser.dump(config), candidates[0], source)
        write_chosen_config(config.write_config, bool(config.get("plan_overwrite")), text)
        print(f"wrote {config.write_config}: fit --config {config.write_config}")
    return 0


def _resolve_auto(
    layout: TrainingLayout, device: tuple[str, float | None], accelerator: str
) -> TrainingLayout:
    """`activation_checkpointing: auto` as fit resolves it, for this device's memory."""
    name, capacity_gb = device
    if capacity_gb is None:
        raise UserError(
            f"activation_checkpointing: auto needs the memory of a device ({name}): pass --device_memory_gb"
        )
    policies, line = choose_checkpointing(layout, capacity_gb * 1e9, accelerator, name)
    print(line)
    parallel = dataclasses.replace(layout.parallel, activation_checkpointing=policies)
    return dataclasses.replace(layout, parallel=parallel)


def calibrate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning plan calibrate", description=calibrate_table.__doc__
    )
    parser.add_argument("--out", type=user_path, default=None, help="also write the table here (YAML)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out file that holds an earlier calibration table",
    )
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        help="CPU: measure with each of these numbers of processes running at once",
    )
    return parser


def calibrate(argv: list[str]) -> int:
    """`plan calibrate`: this machine's calibration table, printed and (--out) written."""
    parser = calibrate_parser()
    args = parser.parse_args(argv)
    target = (
        None if args.out is None else OutputTarget(Path(args.out), option="--out", overwrite=args.overwrite)
    )
    if target is not None:
        check_output_file(target, DEVICE_TABLE)  # before the minute of measuring
    text = yaml.safe_dump(calibrate_table(tuple(args.processes)), sort_keys=False)
    print(text, end="")
    if target is not None:
        write_output_file(target, DEVICE_TABLE, text)
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "calibrate":
        return calibrate(argv[1:])
    cli = _parse(argv)
    config = cli.config
    layout = layout_from_config(config)
    accelerator = str(config.trainer.accelerator or "cpu")
    device = _device_memory(accelerator, config.get("device_memory_gb"))
    output = None
    if config.get("plan_output"):
        output = OutputTarget(
            Path(config.plan_output),
            option="--plan_output",
            overwrite=bool(config.get("plan_overwrite")),
            overwrite_option="--plan_overwrite true",
        )
        check_output_file(output, PLAN_JSON)  # before the simulation, so its minutes are not lost
    given_table = config.get("device_rates")
    table = load_table(given_table) if given_table else shipped_table(accelerator, device[0])
    source = ", ".join(str(c) for c in config.get("config") or []) or "the given settings"
    if config.get("search"):
        return search(cli, layout, device, table, source)
    if layout.parallel.activation_checkpointing == "auto":
        layout = _resolve_auto(layout, device, accelerator)
    report = simulate_layout(layout)
    prediction = None if table is None else predict_step_time(layout, report, table)
    print(format_report(layout, report, device, source, prediction))
    if output is not None:
        plan_json = {
            "layout": dataclasses.asdict(layout),
            "device": {"name": device[0], "memory_gb": device[1]},
            "report": dataclasses.asdict(report),
            "prediction": None if prediction is None else dataclasses.asdict(prediction),
        }
        write_output_file(output, PLAN_JSON, json.dumps(plan_json, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
