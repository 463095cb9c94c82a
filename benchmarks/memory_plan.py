"""The memory plan (`mistral-lightning plan`) against measured peaks, and what it predicts for the 7B recipe.

    python -m mistral_lightning.benchmarks.memory_plan [--only cpu h200 recipe] [--seq 2048 8192]

1. cpu: the bench config (benchmarks/common.py, bf16, batch 1) at 2K and 8K. The fit config
   `benchmarks/train_throughput.py` trains is planned, then trained by `mistral-lightning fit` in a fresh
   process with `AllocatorPeak` (the CPU allocator's own peak), eager as the plan simulates it, and
   compiled as `make bench` runs it (compiled blocks free some intermediates sooner).
2. h200: the three runs of `benchmarks/gpu.py` on one H200 (results/h200/gpu_layers*.json): the plain model
   gpu.py builds (bf16 weights and AdamW states, no FSDP), in gpu.py's loop, with the attention path that
   card ran (the portable blocked SDPA: no flash-attn was installed).
3. recipe: configs/mistral-7b-32k/finetune_tp8.yaml in the layouts of its 8 devices with each activation
   checkpointing mode, and on two nodes of 8; per rank, against an Ascend 910B (64 GB) and an H100 (80 GB).
Results: results/memory_plan.json and results/memory_plan.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

from mistral_lightning.benchmarks.common import (
    BENCH_CONFIG,
    RESULTS_DIR,
    machine,
    save_json,
    write_random_tokens,
)
from mistral_lightning.benchmarks.train_throughput import fit_config
from mistral_lightning.child_processes import python_module_command, safe_path_env
from mistral_lightning.cli import plan as plan_cli
from mistral_lightning.cli.plan import layout_from_config, parse_config
from mistral_lightning.config import MistralConfig
from mistral_lightning.kernels import attention_dispatch
from mistral_lightning.model import Mistral
from mistral_lightning.training.layouts import simulate_layout
from mistral_lightning.training.memory_plan import StepShape, simulate_training_step
from mistral_lightning.training.optim import OptimizerConfig, build_optimizer
from mistral_lightning.training.parallel import apply_activation_checkpointing

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "mistral-7b-32k" / "finetune_tp8.yaml"
GB = 1e9
# (layers, activation checkpointing) of each H200 run and its result file.
H200_RUNS = {
    (32, "full"): "gpu_layers.json",
    (16, "selective"): "gpu_layers_selective_16.json",
    (8, "none"): "gpu_layers_none_8.json",
}
# (data_parallel, tensor_parallel, activation checkpointing) of the recipe's 8 devices.
RECIPE_LAYOUTS = [
    (1, 8, "full"),
    (1, 8, "selective"),
    (1, 8, "none"),
    (2, 4, "full"),
    (2, 4, "selective"),
    (4, 2, "full"),
    (8, 1, "full"),
    (2, 8, "full"),  # two nodes of 8: TP inside a node, DP across the two (README, "Multi-node training")
]
DEVICES_GB = {"Ascend 910B": 64, "H100": 80}


def mistral_lightning(*args: str) -> None:
    """Run `mistral-lightning ...` in a fresh process (its own peak), from the repository root."""
    done = subprocess.run(
        python_module_command("mistral_lightning", *args),
        cwd=REPO,
        env=safe_path_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"mistral-lightning {' '.join(args)} failed:\n{done.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------- cpu
def validate_cpu(seq_lengths: list[int], steps: int = 3) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seq_length in seq_lengths:
            data = write_random_tokens(folder, seq_length, steps + 1)
            row: dict = {"seq_length": seq_length}
            for compiled in (False, True):
                run = folder / f"{seq_length}_{'compiled' if compiled else 'eager'}"
                config = fit_config(
                    dataclasses.asdict(BENCH_CONFIG),
                    data,
                    seq_length,
                    steps,
                    str(run),
                    str(run / "throughput.json"),
                    "none",
                    None,
                    compiled,
                )
                config["trainer"]["callbacks"].append(
                    {
                        "class_path": "mistral_lightning.benchmarks.allocator_peak.AllocatorPeak",
                        "init_args": {"out_dir": str(run)},
                    }
                )
                path = folder / f"fit_{seq_length}_{compiled}.yaml"
                path.write_text(json.dumps(config))  # JSON is YAML
                if not compiled:  # the plan simulates eager blocks; a compiled run's plan is the same one
                    mistral_lightning(
                        "plan", "--config", str(path), "--plan_output", str(folder / "plan.json")
                    )
                    row["plan"] = json.loads((folder / "plan.json").read_text())["report"]
                mistral_lightning("fit", "--config", str(path))
                row["compiled" if compiled else "eager"] = json.loads((run / "rank0.json").read_text())
            predicted = row["plan"]["peak_bytes"]
            row["plan_vs_eager"] = predicted / row["eager"]["peak_allocated_bytes"] - 1
            row["plan_vs_compiled"] = predicted / row["compiled"]["peak_allocated_bytes"] - 1
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- h200
def validate_h200(results_dir: Path = RESULTS_DIR / "h200") -> list[dict]:
    rows = []
    for (layers, checkpointing), name in H200_RUNS.items():
        measured = json.loads((results_dir / name).read_text())
        config = MistralConfig.from_name("mistral-7b-32k", num_layers=layers)

        def build(config=config, checkpointing=checkpointing) -> Mistral:
            # As benchmarks/gpu.py builds it: bf16 weights, checkpointing applied, no parallel plan.
            with torch.device("meta"):
                model = Mistral(config).to(torch.bfloat16)
            apply_activation_checkpointing(model, checkpointing)
            return model

        # The H200 ran the portable path for CUDA tensors, blocked SDPA; the CPU takes it too where it has
        # no native bf16 matmuls (with them, the banded kernel, which saves less).
        with mock.patch.object(attention_dispatch, "cpu_has_bf16_matmul", lambda: False):
            report = simulate_training_step(
                build,
                lambda model: build_optimizer(model, OptimizerConfig()),
                StepShape(micro_batch_size=1, seq_length=measured["seq_length"]),
                lightning_order=False,  # gpu.py: backward, step, zero_grad
            )
        row = {
            "layers": layers,
            "activation_checkpointing": checkpointing,
            "measured_peak_bytes": measured["peak_memory_bytes"],
            "plan": dataclasses.asdict(report),
            "plan_vs_measured": report.peak_bytes / measured["peak_memory_bytes"] - 1,
        }
        print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- recipe
@contextlib.contextmanager
def _fsdp_input_cast_off(enabled: bool) -> Iterator[None]:
    """Selective checkpointing with bf16-mixed fails at the first backward under torch 2.13: FSDP2's cast of a
    block's inputs enters a profiler range (an operator) outside the checkpointed region in the forward pass
    and inside it in the recomputation, which selective checkpointing refuses. Block inputs are bf16 already,
    so switching the cast off changes no memory; these rows simulate the plan with it off."""
    if not enabled:
        yield
        return
    policy = plan_cli.mixed_precision_policy
    with mock.patch.object(
        plan_cli,
        "mixed_precision_policy",
        lambda precision: dataclasses.replace(policy(precision), cast_forward_inputs=False),
    ):
        yield


def predict_recipe(layouts: list[tuple[int, int, str]] = RECIPE_LAYOUTS) -> list[dict]:
    base = layout_from_config(parse_config(["--config", str(RECIPE)]))
    rows = []
    for data_parallel, tensor_parallel, checkpointing in layouts:
        layout = dataclasses.replace(
            base,
            data_parallel=data_parallel,
            tensor_parallel=tensor_parallel,
            parallel=dataclasses.replace(base.parallel, activation_checkpointing=checkpointing),
        )
        with _fsdp_input_cast_off(checkpointing == "selective"):
            report = simulate_layout(layout)
        row = {
            "data_parallel": data_parallel,
            "tensor_parallel": tensor_parallel,
            "activation_checkpointing": checkpointing,
            "plan": dataclasses.asdict(report),
            "headroom_gb": {device: gb - report.peak_bytes / GB for device, gb in DEVICES_GB.items()},
        }
        print(
            json.dumps({**{k: v for k, v in row.items() if k != "plan"}, "peak_gb": report.peak_bytes / GB}),
            flush=True,
        )
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = []
    if results.get("cpu"):
        lines += [
            "CPU, bench config, bf16, batch 1 (peak allocated, the CPU allocator's own count):",
            "",
            "| seq | plan | fit, eager | plan vs eager | fit, compiled | plan vs compiled "
            "| peak RSS eager / compiled |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in results["cpu"]:
            lines.append(
                f"| {row['seq_length']} | {row['plan']['peak_bytes'] / GB:.3f} GB | "
                f"{row['eager']['peak_allocated_bytes'] / GB:.3f} GB | {row['plan_vs_eager']:+.1%} | "
                f"{row['compiled']['peak_allocated_bytes'] / GB:.3f} GB | {row['plan_vs_compiled']:+.1%} | "
                f"{row['eager']['peak_rss_bytes'] / GB:.2f} / {row['compiled']['peak_rss_bytes'] / GB:.2f} GB |"
            )
        lines.append("")
    if results.get("h200"):
        lines += [
            "One H200, 7B layers at seq 32768 (benchmarks/gpu.py; measured: max_memory_allocated):",
            "",
            "| layers | checkpointing | plan | measured | plan vs measured |",
            "|---|---|---|---|---|",
        ]
        for row in results["h200"]:
            lines.append(
                f"| {row['layers']} | {row['activation_checkpointing']} | {row['plan']['peak_bytes'] / GB:.1f} GB | "
                f"{row['measured_peak_bytes'] / GB:.1f} GB | {row['plan_vs_measured']:+.1%} |"
            )
        lines.append("")
    if results.get("recipe"):
        lines += [
            f"{RECIPE.relative_to(REPO)}: per rank, seq 32768, micro-batch 1, bf16-mixed (fp32 master weights, "
            "gradients and AdamW states), sequence parallel:",
            "",
            "| layout | checkpointing | parameters | gradients | optimizer state | activations at the peak | peak | "
            + " | ".join(f"{device} ({gb} GB): headroom" for device, gb in DEVICES_GB.items())
            + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(DEVICES_GB),
        ]
        for row in results["recipe"]:
            at_peak, peak = row["plan"]["at_peak"], row["plan"]["peak_bytes"] / GB
            lines.append(
                f"| TP{row['tensor_parallel']} x DP{row['data_parallel']} | {row['activation_checkpointing']} | "
                f"{at_peak['parameters'] / GB:.2f} GB | {at_peak['gradients'] / GB:.2f} GB | "
                f"{at_peak['optimizer_state'] / GB:.2f} GB | {at_peak['activations'] / GB:.2f} GB | "
                f"**{peak:.1f} GB** | "
                + " | ".join(f"{row['headroom_gb'][device]:+.1f} GB" for device in DEVICES_GB)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", choices=["cpu", "h200", "recipe"], default=["cpu", "h200", "recipe"]
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192], help="cpu: sequence lengths")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    path = args.results_dir / "memory_plan.json"
    results = json.loads(path.read_text()) if path.is_file() else {}  # sections not re-run are kept
    if "cpu" in args.only:
        results["cpu"] = validate_cpu(args.seq)
    if "h200" in args.only:
        results["h200"] = validate_h200()
    if "recipe" in args.only:
        results["recipe"] = predict_recipe()
    results["machine"] = machine()
    save_json("memory_plan", results, args.results_dir)
    (args.results_dir / "memory_plan.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
