"""`mistral-lightning plan --search`: the layouts of a config's devices that fit, fastest first, and the chosen
one written as a config `fit` reads (`--write_config`). The search itself is training/layouts.py's."""

from __future__ import annotations

from pathlib import Path

import yaml

from mistral_lightning.errors import UserError
from mistral_lightning.outputs import FileKind, OutputTarget, check_output_file, write_output_file
from mistral_lightning.training.layouts import Candidate, TrainingLayout
from mistral_lightning.training.parallel import describe_policies, layer_policies

# What --write_config writes starts with this line; only such a file is replaced (with --plan_overwrite true).
WRITTEN_BY = "# written by mistral-lightning plan --search:"
SEARCH_CONFIG = FileKind("config written by plan --search", lambda head: head.startswith(WRITTEN_BY.encode()))
# The plan's own options: a `fit` config has none of them.
PLAN_OPTIONS = (
    "device_memory_gb",
    "device_rates",
    "plan_output",
    "plan_overwrite",
    "search",
    "search_headroom",
    "write_config",
)


def describe_layout(layout: TrainingLayout) -> str:
    step = layout.step
    policies = layer_policies(layout.parallel.activation_checkpointing, layout.model.num_layers)
    return (
        f"TP{layout.tensor_parallel} x DP{layout.data_parallel}"
        + (f" x CP{layout.context_parallel}" if layout.context_parallel > 1 else "")
        + f", micro-batch {step.micro_batch_size} x {step.micro_batches}, checkpointing {describe_policies(policies)}"
    )


def format_search(candidates: list[Candidate], capacity_gb: float, headroom: float, top: int = 10) -> str:
    lines = [
        f"layouts that fit {capacity_gb:.1f} GB less {headroom:.0%} headroom, fastest first "
        f"(of {len(candidates)}; the first simulated as it is, the others priced from their layout's uniform "
        "simulations)",
        "",
        "| # | layout | peak per device | predicted s/step | tokens/s per device |",
        "|---|---|---|---|---|",
    ]
    for index, candidate in enumerate(candidates[:top], 1):
        lines.append(
            f"| {index} | {describe_layout(candidate.layout)} | {candidate.peak_bytes / 1e9:.2f} GB | "
            f"{candidate.prediction.seconds:.3g} | {candidate.prediction.tokens_per_second_per_device:,.0f} |"
        )
    return "\n".join(lines)


def chosen_config(dumped: str, candidate: Candidate, source: str) -> str:
    """The parsed `fit` config (`dumped`, as its parser writes it) with the candidate's layout."""
    settings = yaml.safe_load(dumped)
    for option in PLAN_OPTIONS:
        settings.pop(option, None)
    layout = candidate.layout
    trainer = settings["trainer"]
    init_args = trainer["strategy"].setdefault("init_args", {})
    init_args["data_parallel_size"], init_args["tensor_parallel_size"] = (
        layout.data_parallel,
        layout.tensor_parallel,
    )
    trainer["devices"] = layout.world_size // int(trainer.get("num_nodes") or 1)
    trainer["accumulate_grad_batches"] = layout.step.micro_batches
    settings["data"]["init_args"]["micro_batch_size"] = layout.step.micro_batch_size
    policies = layer_policies(layout.parallel.activation_checkpointing, layout.model.num_layers)
    settings["model"].setdefault("parallel", {})["activation_checkpointing"] = (
        policies[0] if len(set(policies)) == 1 else policies
    )
    header = (
        f"{WRITTEN_BY} {source} as {describe_layout(layout)}; planned peak {candidate.peak_bytes / 1e9:.2f} GB, "
        f"{candidate.prediction.tokens_per_second_per_device:,.0f} tokens/s per device ({candidate.prediction.rates.name})\n"
    )
    return header + yaml.safe_dump(settings, sort_keys=False, default_flow_style=None)


def write_chosen_config(path: str, overwrite: bool, text: str) -> None:
    target = OutputTarget(
        Path(path), option="--write_config", overwrite=overwrite, overwrite_option="--plan_overwrite true"
    )
    write_output_file(target, SEARCH_CONFIG, text)


def check_config_target(path: str, overwrite: bool) -> None:
    """Before the search's minutes: the --write_config file can be written."""
    target = OutputTarget(
        Path(path), option="--write_config", overwrite=overwrite, overwrite_option="--plan_overwrite true"
    )
    check_output_file(target, SEARCH_CONFIG)


def nothing_fits(capacity_gb: float, headroom: float) -> UserError:
    return UserError(
        f"no layout of these devices fits {capacity_gb:.1f} GB less {headroom:.0%} headroom, even with every block "
        "fully checkpointed; add devices (trainer.devices / num_nodes), shorten data.init_args.seq_length, or use "
        "LoRA (model.lora)"
    )
