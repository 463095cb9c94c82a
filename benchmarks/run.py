"""`make bench`: every CPU benchmark, then the JSON results, a markdown summary and a plot in benchmarks/results/.

    python -m mistral_lightning.benchmarks.run [--quick] [--results-dir DIR]

1. the bf16 matmul peak (before and after the training runs; the higher one is the peak);
2. training throughput and peak memory, ours through `fit` against transformers, at 2K..32K
   (two alternating rounds at the target lengths 2048 and 8192, one elsewhere);
3. CPU MFU at seq 2048 from those;
4. preprocessing throughput (benchmarks/preprocess_throughput.py).
Ours trains with `model.parallel.compile: true` (torch.compile per block), `--no-compile` for eager.
`--quick` runs the same harness on the tiny model at short lengths, eager (seconds; its figures mean nothing).
About 15 minutes on a quiet 2-core machine; figures from a busy machine are lower, ratios less so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
from pathlib import Path

import torch

from mistral_lightning.benchmarks import long_context
from mistral_lightning.benchmarks.common import BENCH_CONFIG, RESULTS_DIR, TINY_CONFIG, machine, save_json
from mistral_lightning.benchmarks.cpu_mfu import matmul_peak_tflops, mfu
from mistral_lightning.benchmarks.report import TARGET_SEQ_LONG, TARGET_SEQ_MID, TARGET_SEQ_SHORT, markdown
from mistral_lightning.benchmarks.train_throughput import OURS_ACTIVATION_CHECKPOINTING, compare
from mistral_lightning.child_processes import python_module_command, safe_path_env

REPO = Path(__file__).resolve().parents[1]
TARGET_LENGTHS = (TARGET_SEQ_SHORT, TARGET_SEQ_MID, TARGET_SEQ_LONG)


def preprocess_throughput(rows: int) -> dict:
    completed = subprocess.run(
        python_module_command("mistral_lightning.benchmarks.preprocess_throughput", "--rows", str(rows)),
        env=safe_path_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-run the harness on the tiny model")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="ours: torch.compile per block"
    )
    args = parser.parse_args(argv)
    out = args.results_dir
    if args.quick:
        config, model, seqs, short = TINY_CONFIG, "tiny", [128, 256], 128
        rounds, steps, checkpointing, preprocess_rows = 1, 3, {}, 2000
    else:
        config, model, seqs, short = BENCH_CONFIG, "bench", long_context.SEQ_LENGTHS, TARGET_SEQ_SHORT
        rounds = {seq: 2 if seq in (TARGET_SEQ_SHORT, TARGET_SEQ_MID) else 1 for seq in seqs}
        steps, checkpointing, preprocess_rows = None, OURS_ACTIVATION_CHECKPOINTING, 20000

    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul peak on the same threads as the training runs
    peaks = [matmul_peak_tflops(1024 if args.quick else 4096)]
    rows = compare(
        seqs,
        rounds=rounds,
        model=model,
        activation_checkpointing=checkpointing,
        peak_tflops=peaks[0],
        steps=steps,
        compile=args.compile and not args.quick,
    )
    peaks.append(matmul_peak_tflops(1024 if args.quick else 4096))
    peak = max(peaks)
    ours_short = next(row for row in rows if row["seq_length"] == short)["ours"]
    training_mfu = mfu(ours_short["tokens_per_s"], config, short, peak)
    transformers_short = next(row for row in rows if row["seq_length"] == short).get("transformers")

    host = machine()
    save_json(
        "train_throughput",
        {
            "machine": host,
            "config": dataclasses.asdict(config),
            "rows": [row for row in rows if args.quick or row["seq_length"] in TARGET_LENGTHS],
        },
        out,
    )
    long_context.save(rows, out)
    save_json(
        "cpu_mfu",
        {
            "machine": host,
            "seq_length": short,
            "matmul_peak_tflops_runs": peaks,
            "matmul_peak_tflops": peak,
            "ours_mfu": training_mfu,
            "transformers_mfu": transformers_short
            and mfu(transformers_short["tokens_per_s"], config, short, peak),
        },
        out,
    )
    preprocess = preprocess_throughput(preprocess_rows)
    save_json("preprocess_throughput", preprocess, out)
    summary = markdown(rows, host, peak, training_mfu)
    summary += "\nPreprocessing: " + ", ".join(
        f"{key.replace('_', ' ')}: {value['tokens_per_s']} tokens/s"
        for key, value in preprocess.items()
        if key.startswith("workers_")
    )
    summary += f" ({preprocess['rows']} rows, byte-identical outputs: {preprocess['byte_identical']}).\n"
    (out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
