"""The plan's predicted step time against the step time `fit` measures, layout by layout, on this machine.

    python -P -m mistral_lightning.benchmarks.plan_step_time [--seq 1024] [--steps 4] [--rates cpu-2core]

The bench config (benchmarks/common.py: 8 layers of width 512, window 512) in fp32, batch 1, on 1, 2 and 4 gloo
processes of this machine (threads split between them), with no, selective, full and mixed activation
checkpointing, under TP and DP. Each layout goes through `mistral-lightning plan --plan_output` (its prediction
at the calibration table's rates) and a fresh `mistral-lightning fit` whose ranks record their step times
(StepTimes; the first step left out). Writes benchmarks/results/plan_step_time.{json,md}: predicted and measured
seconds per step, their ratio, and whether the plan's order of the layouts (by tokens/s per device) is the
measured one. Last, `activation_checkpointing: auto` on one process under a device budget between the planned
peaks of "full" and "none": the plan picks a mix (as fit would), which is then measured against "full".
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from mistral_lightning.benchmarks.common import RESULTS_DIR, machine, save_json, write_random_tokens
from mistral_lightning.benchmarks.context_parallel_scaling import fit_config, run_command

# name, (data, tensor) parallel sizes, activation checkpointing.
LAYOUTS = (
    ("1 process, none", (1, 1), "none"),
    ("1 process, selective", (1, 1), "selective"),
    ("1 process, full", (1, 1), "full"),
    ("1 process, 4 none + 4 full", (1, 1), ["none"] * 4 + ["full"] * 4),
    ("DP2, none", (2, 1), "none"),
    ("TP2, none", (1, 2), "none"),
    ("DP2 x TP2, full", (2, 2), "full"),
)


def measure(
    data_prefix: str,
    root: Path,
    layout: tuple,
    seq: int,
    steps: int,
    rates: str,
    device_memory_gb: float | None = None,
) -> dict:
    name, (data_parallel, tensor_parallel), checkpointing = layout
    ranks = data_parallel * tensor_parallel
    root.mkdir(parents=True)
    settings = fit_config(data_prefix, root, ranks, seq, steps)
    settings["trainer"]["precision"] = "32-true"
    settings["trainer"]["strategy"]["init_args"] = {
        "data_parallel_size": data_parallel,
        "tensor_parallel_size": tensor_parallel,
        "context_parallel_size": 1,
    }
    settings["trainer"]["callbacks"] = settings["trainer"]["callbacks"][1:]  # step times only
    settings["model"]["parallel"] = {
        "activation_checkpointing": checkpointing,
        "sequence_parallel": tensor_parallel > 1,
    }
    settings["data"]["init_args"]["micro_batch_size"] = 1
    config = root / "fit.yaml"
    config.write_text(json.dumps(settings))
    plan_file = root / "plan.json"
    memory = [] if device_memory_gb is None else ["--device_memory_gb", str(device_memory_gb)]
    plan_command = ["plan", "--config", str(config), "--device_rates", rates, "--plan_output", str(plan_file)]
    run_command([*plan_command, *memory], root, 1)
    planned = json.loads(plan_file.read_text())
    chosen = planned["layout"]["parallel"]["activation_checkpointing"]
    if checkpointing == "auto":  # fit takes the mix the plan chose, as fit's own auto would
        settings["model"]["parallel"]["activation_checkpointing"] = chosen
        config.write_text(json.dumps(settings))
    run_command(["fit", "--config", str(config)], root, max(1, (os.cpu_count() or 1) // ranks))
    times = [json.loads((root / "measured" / f"times{rank}.json").read_text()) for rank in range(ranks)]
    measured = max(sum(rank_times[1:]) / len(rank_times[1:]) for rank_times in times)
    prediction = planned["prediction"]
    tokens = seq * data_parallel
    return {
        "layout": name,
        "ranks": ranks,
        "checkpointing": chosen,
        "planned_peak_bytes": planned["report"]["peak_bytes"],
        "predicted_s_per_step": prediction["seconds"],
        "measured_s_per_step": measured,
        "predicted_tokens_per_sec_per_device": prediction["tokens_per_second_per_device"],
        "measured_tokens_per_sec_per_device": tokens / ranks / measured,
    }


def markdown(rows: list[dict], where: dict, seq: int, rates: str) -> str:
    by_prediction = sorted(rows, key=lambda r: -r["predicted_tokens_per_sec_per_device"])
    by_measurement = sorted(rows, key=lambda r: -r["measured_tokens_per_sec_per_device"])
    lines = [
        "# The plan's predicted step time against `fit`'s, on the CPU",
        "",
        f"{where['cpu']}, {where['cores']} cores (threads split between the ranks), torch {where['torch']}; the "
        f"bench config in fp32, batch 1 x {seq} tokens; rates: the `{rates}` table.",
        "",
        "| layout | predicted s/step | measured s/step | predicted / measured | tokens/s per device (measured) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = row["predicted_s_per_step"] / row["measured_s_per_step"]
        lines.append(
            f"| {row['layout']} | {row['predicted_s_per_step']:.2f} | {row['measured_s_per_step']:.2f} | "
            f"{ratio:.2f} | {row['measured_tokens_per_sec_per_device']:.0f} |"
        )
    lines += [
        "",
        f"Fastest per device, predicted: {by_prediction[0]['layout']}; measured: {by_measurement[0]['layout']}.",
        "Predicted order: " + ", ".join(row["layout"] for row in by_prediction) + ".",
        "Measured order: " + ", ".join(row["layout"] for row in by_measurement) + ".",
        "",
    ]
    return "\n".join(lines)


def auto_markdown(auto: dict, rows: list[dict]) -> str:
    by_name = {row["layout"]: row for row in rows}
    none, full = by_name["1 process, none"], by_name["1 process, full"]
    mix = auto["checkpointing"]
    mix = [mix] if isinstance(mix, str) else mix
    counts = ", ".join(
        f"{mix.count(policy)} {policy}" for policy in ("none", "selective", "full") if policy in mix
    )
    table = [
        f"| {name} | {row['planned_peak_bytes'] / 1e6:.0f} MB | {row['predicted_s_per_step']:.2f} | "
        f"{row['measured_s_per_step']:.2f} |"
        for name, row in (("none (does not fit)", none), (f"auto: {counts}", auto), ("full", full))
    ]
    return "\n".join(
        [
            "## `activation_checkpointing: auto` under a device budget",
            "",
            f'A device of {auto["device_memory_gb"] * 1e3:.0f} MB, 10% kept free: "none" does not fit, "full" '
            f"does. The plan chose {counts}.",
            "",
            "| checkpointing | planned peak | predicted s/step | measured s/step |",
            "|---|---|---|---|",
            *table,
            "",
            f"auto ran {full['measured_s_per_step'] / auto['measured_s_per_step']:.2f}x the speed of full.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rates", default="cpu-2core", help="calibration table (plan --device_rates)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = write_random_tokens(Path(scratch), args.seq, num_samples=2 * args.steps + 2)
        for index, layout in enumerate(LAYOUTS):
            rows.append(
                measure(data, Path(scratch) / f"layout{index}", layout, args.seq, args.steps, args.rates)
            )
            print(json.dumps(rows[-1]), flush=True)
        peaks = {row["layout"]: row["planned_peak_bytes"] for row in rows}
        # A device on which "full" fits (with the 10% headroom) and "none" does not.
        budget_gb = (peaks["1 process, none"] + peaks["1 process, full"]) / 2 / 0.9 / 1e9
        auto = ("1 process, auto", (1, 1), "auto")
        auto_row = measure(data, Path(scratch) / "auto", auto, args.seq, args.steps, args.rates, budget_gb)
        auto_row["device_memory_gb"] = budget_gb
        print(json.dumps(auto_row), flush=True)
    where = machine()
    results = {"machine": where, "seq": args.seq, "rates": args.rates, "runs": rows, "auto": auto_row}
    save_json("plan_step_time", results)
    text = markdown(rows, where, args.seq, args.rates) + auto_markdown(auto_row, rows)
    (RESULTS_DIR / "plan_step_time.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
