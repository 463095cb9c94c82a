"""Peak memory per rank and tokens/s as context parallelism grows, through the real `fit`, with the plan's
prediction of each run beside it.

    python -P -m mistral_lightning.benchmarks.context_parallel_scaling [--seq 16384 32768 65536] [--ranks 1 2 4] [--steps 3]

The bench config (benchmarks/common.py: 8 layers, window 512) in bf16, batch 1, full activation checkpointing,
on 1, 2 and 4 gloo processes of this machine (threads split between them). Each run is a fresh
`mistral-lightning fit`: its ranks record their peak allocated bytes (AllocatorPeak) and step times (StepTimes);
tokens/s leaves out the first step. The same config goes through `mistral-lightning plan`. Writes
benchmarks/results/context_parallel_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import tempfile
from pathlib import Path

from mistral_lightning.benchmarks.common import (
    BENCH_CONFIG,
    RESULTS_DIR,
    machine,
    save_json,
    write_random_tokens,
)
from mistral_lightning.child_processes import python_module_command, safe_path_env


def fit_config(data_prefix: str, root: Path, ranks: int, seq: int, steps: int) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": ranks,
            "strategy": {
                "class_path": "mistral_lightning.training.strategy.DeviceModelParallelStrategy",
                "init_args": {
                    "data_parallel_size": 1,
                    "tensor_parallel_size": 1,
                    "context_parallel_size": ranks,
                },
            },
            "precision": "bf16-true",
            "max_steps": steps,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "mistral_lightning.benchmarks.allocator_peak.AllocatorPeak",
                    "init_args": {"out_dir": str(root / "measured")},
                },
                {
                    "class_path": "mistral_lightning.benchmarks.common.StepTimes",
                    "init_args": {"out_dir": str(root / "measured")},
                },
            ],
        },
        "model": {
            "model_config": dataclasses.asdict(BENCH_CONFIG),
            "parallel": {"activation_checkpointing": "full", "sequence_parallel": False},
        },
        "data": {
            "class_path": "mistral_lightning.data.datamodules.PretrainDataModule",
            "init_args": {
                "data_prefixes": [data_prefix],
                "seq_length": seq,
                "micro_batch_size": 1,
                "split": "1,0,0",
                "num_workers": 0,
                "cross_document_attention": True,
            },
        },
    }


def run_command(arguments: list[str], root: Path, threads: int) -> None:
    """`mistral-lightning ARGUMENTS` in a fresh process in `root`, with `threads` intra-op threads per rank."""
    environment = {**safe_path_env(), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(
        python_module_command("mistral_lightning", *arguments), cwd=root, env=environment, check=True
    )


def measure(data_prefix: str, root: Path, ranks: int, seq: int, steps: int) -> dict:
    root.mkdir(parents=True)
    config = root / "fit.yaml"
    config.write_text(json.dumps(fit_config(data_prefix, root, ranks, seq, steps)))
    run_command(["plan", "--config", str(config), "--plan_output", str(root / "plan.json")], root, 1)
    threads = max(1, (os.cpu_count() or 1) // ranks)
    run_command(["fit", "--config", str(config)], root, threads)
    peaks = [json.loads((root / "measured" / f"rank{rank}.json").read_text()) for rank in range(ranks)]
    times = [json.loads((root / "measured" / f"times{rank}.json").read_text()) for rank in range(ranks)]
    step_seconds = max(sum(rank_times[1:]) / len(rank_times[1:]) for rank_times in times)
    return {
        "context_parallel": ranks,
        "seq": seq,
        "peak_allocated_bytes": [peak["peak_allocated_bytes"] for peak in peaks],
        "planned_peak_bytes": json.loads((root / "plan.json").read_text())["report"]["peak_bytes"],
        "s_per_step": step_seconds,
        "tokens_per_sec": seq / step_seconds,
    }


def markdown(rows: list[dict], where: dict) -> str:
    lines = [
        "# Context parallelism on the CPU: peak memory per rank and tokens/s as CP grows",
        "",
        f"{where['cpu']}, {where['cores']} cores (threads split between the ranks), torch {where['torch']}; "
        "the bench config in bf16, batch 1, full activation checkpointing, window 512.",
        "",
        "| seq | CP | peak per rank (measured, max) | planned | plan / measured | s/step | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        measured = max(row["peak_allocated_bytes"])
        lines.append(
            f"| {row['seq']} | {row['context_parallel']} | {measured / 1e9:.2f} GB | "
            f"{row['planned_peak_bytes'] / 1e9:.2f} GB | {row['planned_peak_bytes'] / measured:.2f} | "
            f"{row['s_per_step']:.1f} | {row['tokens_per_sec']:.0f} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seq in args.seq:
            data = write_random_tokens(Path(scratch), seq, num_samples=args.steps + 1)
            for ranks in args.ranks:
                rows.append(measure(data, Path(scratch) / f"seq{seq}_cp{ranks}", ranks, seq, args.steps))
                print(json.dumps(rows[-1]), flush=True)
    where = machine()
    save_json("context_parallel_scaling", {"machine": where, "runs": rows})
    text = markdown(rows, where)
    (RESULTS_DIR / "context_parallel_scaling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
