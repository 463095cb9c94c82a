"""Training tokens/s and peak memory: ours through the real `fit` loop against transformers, side by side.

    python -m mistral_lightning.benchmarks.train_throughput [--seq 2048 8192 32768] [--rounds 2] [--peak-tflops X] [--no-compile]

Both sides read the same data (random tokens in a Megatron indexed dataset, through PretrainDataModule),
use the same AdamW (`mistral_lightning.training.optim.build_optimizer`, same hyper-parameters), bf16 weights and
batch 1. Ours is `mistral-lightning fit` (LightningCLI, ModelParallelStrategy, RecipeThroughputMonitor and
MemoryMonitor on), with `model.parallel.compile: true` unless --no-compile; transformers' MistralForCausalLM
(SDPA attention) runs a plain eager loop, as in the performance issue's reference table. Each measurement
is a fresh process (its own peak RSS); the pair alternates within the run (ours, transformers, ours, ...)
and the best round of each is reported, with their ratio. Tokens/s leaves out the first step (one-off
allocation), as RecipeThroughputMonitor does. Transformers is skipped where it would not fit in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from mistral_lightning.benchmarks.common import (
    BENCH_CONFIG,
    TINY_CONFIG,
    available_memory_bytes,
    machine,
    run_worker,
    save_json,
    write_random_tokens,
    write_worker_result,
)
from mistral_lightning.benchmarks.cpu_mfu import mfu
from mistral_lightning.callbacks import (
    MemoryMonitor,
    RecipeThroughputMonitor,
    peak_memory,
)
from mistral_lightning.config import MistralConfig
from mistral_lightning.training.optim import OptimizerConfig, ScheduleConfig

# The module's default AdamW settings, given to both sides.
OPTIMIZER = OptimizerConfig()
# No warmup or decay: the transformers loop runs at a fixed LR too.
SCHEDULE = ScheduleConfig(kind="constant", warmup_fraction=0.0)
DATA_SEED = 1234
# Transformers' attention memory and step time grow with T^2 although the window is fixed: by default it
# runs up to 8K only (the figures at 16K: results/notes.md).
TRANSFORMERS_MAX_SEQ = 8192
# Ours at lengths whose activations would not fit the 8 GB target otherwise (training/parallel.py's option).
OURS_ACTIVATION_CHECKPOINTING: dict[int, str] = {}
REPO = Path(__file__).resolve().parents[1]


def default_steps(seq_length: int) -> int:
    """Optimizer steps per measurement, the first one not timed: ~6 at 2K down to 3 from 16K."""
    return max(3, min(6, 2 + 16384 // seq_length))


def transformers_fits(seq_length: int) -> bool:
    # ~2 GB plus its T x T attention masks and scores; a deliberate over-estimate of the table.
    return 2e9 + 64 * seq_length**2 < 0.9 * available_memory_bytes()


# ---------------------------------------------------------------------------------------------- ours
class ResultWriter(L.Callback):
    """Copies the RecipeThroughputMonitor summary and the MemoryMonitor peak into a JSON file at the end of fit."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = next(cb.summary for cb in trainer.callbacks if isinstance(cb, RecipeThroughputMonitor))
        memory = next(cb.peak_memory_bytes for cb in trainer.callbacks if isinstance(cb, MemoryMonitor))
        write_worker_result(
            self.out,
            {
                "tokens_per_s": summary.get("tokens_per_sec_per_device"),
                "s_per_step": summary.get("s_per_step"),
                "mfu": summary.get("mfu"),
                "peak_rss_bytes": memory,
                "loss": float(trainer.callback_metrics["train/loss"]),
                "steps": summary["iterations"],
            },
        )


def fit_config(
    model_config: dict,
    data_prefix: str,
    seq_length: int,
    steps: int,
    workdir: str,
    out: str,
    activation_checkpointing: str,
    peak_tflops: float | None,
    compile: bool,
) -> dict:
    """The LightningCLI config of `mistral-lightning fit` for one measurement (JSON is valid YAML)."""
    return {
        "seed_everything": 0,
        "model": {
            "model_config": model_config,
            "optimizer": dataclasses.asdict(OPTIMIZER),
            "schedule": dataclasses.asdict(SCHEDULE),
            "parallel": {"activation_checkpointing": activation_checkpointing, "compile": compile},
        },
        "data": {
            "class_path": "mistral_lightning.data.datamodules.PretrainDataModule",
            "init_args": {
                "data_prefixes": [data_prefix],
                "seq_length": seq_length,
                "micro_batch_size": 1,
                "split": "1,0,0",
                "seed": DATA_SEED,
                "num_workers": 0,
                # Whole random documents: no document masks, as transformers sees the batch.
                "cross_document_attention": True,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "bf16-true",
            "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},
            "max_steps": steps,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": workdir,
            "callbacks": [
                {
                    "class_path": "mistral_lightning.callbacks.RecipeThroughputMonitor",
                    "init_args": {"window_size": 2, "peak_tflops": peak_tflops},
                },
                {"class_path": "mistral_lightning.callbacks.MemoryMonitor"},
                {
                    "class_path": "mistral_lightning.benchmarks.train_throughput.ResultWriter",
                    "init_args": {"out": out},
                },
            ],
        },
    }


def run_ours(args: argparse.Namespace) -> None:
    from mistral_lightning.cli import main as mistral_lightning

    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "fit.yaml"
        config.write_text(
            json.dumps(
                fit_config(
                    dataclasses.asdict(config_named(args.model)),
                    args.data,
                    args.seq,
                    args.steps,
                    workdir,
                    args.out,
                    args.activation_checkpointing,
                    args.peak_tflops,
                    args.compile,
                )
            )
        )
        status = mistral_lightning(["fit", "--config", str(config)])
    if status:
        raise SystemExit(status)


# -------------------------------------------------------------------------------------- transformers
def run_transformers(args: argparse.Namespace) -> None:
    import transformers

    from mistral_lightning.data.datamodules import PretrainDataModule
    from mistral_lightning.training.optim import build_optimizer

    config = config_named(args.model)
    data = PretrainDataModule(
        data_prefixes=[args.data],
        seq_length=args.seq,
        micro_batch_size=1,
        split="1,0,0",
        seed=DATA_SEED,
        num_workers=0,
        cross_document_attention=True,
    )
    data.setup("fit")
    batches = iter(data.train_dataloader())
    torch.manual_seed(0)
    hf_config = transformers.MistralConfig(**config.to_hf_dict(), attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)  # built in bf16, as bf16-true builds ours
    model = transformers.MistralForCausalLM(hf_config).train()
    torch.set_default_dtype(torch.float32)
    optimizer = build_optimizer(model, OPTIMIZER)
    timed_from = None
    for step in range(args.steps):
        batch = next(batches)
        loss = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            shift_labels=batch["labels"],  # our labels are already shifted
            use_cache=False,
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            timed_from = time.perf_counter()
    seconds = (time.perf_counter() - timed_from) / (args.steps - 1)
    write_worker_result(
        args.out,
        {
            "tokens_per_s": args.seq / seconds,
            "s_per_step": seconds,
            "mfu": mfu(args.seq / seconds, config, args.seq, args.peak_tflops) if args.peak_tflops else None,
            "peak_rss_bytes": peak_memory(torch.device("cpu"))["peak_rss"],
            "loss": float(loss),
            "steps": args.steps,
        },
    )


# ------------------------------------------------------------------------------------------- harness
def config_named(name: str) -> MistralConfig:
    return {"bench": BENCH_CONFIG, "tiny": TINY_CONFIG}[name]


def measure(
    impl: str,
    seq_length: int,
    data_prefix: str,
    *,
    steps: int,
    model: str = "bench",
    activation_checkpointing: str = "none",
    peak_tflops: float | None = None,
    threads: int | None = None,
    compile: bool = True,
) -> dict:
    """One measurement in a fresh process; `impl` is "ours" or "transformers"."""
    args = [impl, "--seq", str(seq_length), "--data", data_prefix, "--steps", str(steps), "--model", model]
    args += [
        "--activation-checkpointing",
        activation_checkpointing,
        "--compile" if compile else "--no-compile",
    ]
    if peak_tflops:
        args += ["--peak-tflops", str(peak_tflops)]
    load = os.getloadavg()[0]
    result = run_worker("mistral_lightning.benchmarks.train_throughput", args, cwd=REPO, threads=threads)
    return {**result, "load_average_before": round(load, 2)}


def summarize(runs: list[dict]) -> dict | None:
    """The best round (others only add noise from a shared machine) and every round's figure."""
    if not runs:
        return None
    best = max(runs, key=lambda run: run["tokens_per_s"])
    return {
        **best,
        "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
        "rounds_tokens_per_s": [round(run["tokens_per_s"], 1) for run in runs],
    }


def compare(
    seq_lengths: list[int],
    *,
    rounds: int | dict[int, int] = 2,
    model: str = "bench",
    transformers_max_seq: int = TRANSFORMERS_MAX_SEQ,
    activation_checkpointing: dict[int, str] | None = None,
    peak_tflops: float | None = None,
    steps: int | None = None,
    threads: int | None = None,
    compile: bool = True,
) -> list[dict]:
    """Ours and (where it fits) transformers at each length, alternating round by round."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq_length in seq_lengths:
            n_steps = steps or default_steps(seq_length)
            data = write_random_tokens(Path(tmp), seq_length, n_steps + 1)
            checkpointing = (activation_checkpointing or {}).get(seq_length, "none")
            with_transformers = seq_length <= transformers_max_seq and transformers_fits(seq_length)
            runs: dict[str, list[dict]] = {"ours": [], "transformers": []}
            for _ in range(rounds if isinstance(rounds, int) else rounds[seq_length]):
                for impl in ("ours", "transformers") if with_transformers else ("ours",):
                    runs[impl].append(
                        measure(
                            impl,
                            seq_length,
                            data,
                            steps=n_steps,
                            model=model,
                            activation_checkpointing=checkpointing if impl == "ours" else "none",
                            peak_tflops=peak_tflops,
                            threads=threads,
                            compile=compile,
                        )
                    )
            ours, theirs = summarize(runs["ours"]), summarize(runs["transformers"])
            row = {
                "seq_length": seq_length,
                "activation_checkpointing": checkpointing,
                "ours_compiled": compile,
                "ours": ours,
                "transformers": theirs,
            }
            if theirs:
                row["speedup"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
                row["memory_ratio"] = ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: 6 at 2K down to 3 from 16K")
    parser.add_argument("--model", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--transformers-max-seq", type=int, default=TRANSFORMERS_MAX_SEQ)
    parser.add_argument(
        "--activation-checkpointing", default=None, help="ours: none | full | selective (default: per length)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="for MFU (see mistral_lightning.benchmarks.cpu_mfu)"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: fit with model.parallel.compile true (torch.compile per block; the first, untimed step compiles)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: all cores)"
    )
    # Worker mode (one measurement, in its own process): --worker ours|transformers --data PREFIX --out FILE.
    parser.add_argument("--worker", choices=["ours", "transformers"], default=None)
    parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.worker:
        args.seq = args.seq[0]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        (run_ours if args.worker == "ours" else run_transformers)(args)
        return
    rows = compare(
        args.seq,
        rounds=args.rounds,
        model=args.model,
        transformers_max_seq=args.transformers_max_seq,
        activation_checkpointing={seq: args.activation_checkpointing for seq in args.seq}
        if args.activation_checkpointing
        else OURS_ACTIVATION_CHECKPOINTING,
        peak_tflops=args.peak_tflops,
        steps=args.steps,
        threads=args.threads,
        compile=args.compile,
    )
    save_json(
        "train_throughput",
        {"machine": machine(), "config": dataclasses.asdict(config_named(args.model)), "rows": rows},
    )


if __name__ == "__main__":
    main()
