"""`make demo`: the whole product on a laptop CPU, in a few minutes.

synthetic Alpaca-style data -> `preprocess` -> `fit` the tiny preset (printing the recipe's
throughput/memory row) -> HF export -> greedy answers to held-out prompts and 5-shot MMLU on the
synthetic set, for the untrained and the fine-tuned model side by side. Then LoRA next to full
fine-tuning: from the full run's first checkpoint, LoRA adapters train for as many steps as the full run
went on, on the same data, and both are scored with their trainable parameters, peak memory and
tokens/s. Everything goes through the same commands and functions a user calls; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from mistral_lightning import Mistral, MistralConfig, generate
from mistral_lightning.adapters.lora import LoRAConfig, apply_lora
from mistral_lightning.child_processes import python_module_command, safe_path_env
from mistral_lightning.cli import main as cli_main
from mistral_lightning.demo.data import write_demo_data
from mistral_lightning.evaluation.mmlu import evaluate_mmlu
from mistral_lightning.prompts import alpaca_prompt
from mistral_lightning.tokenizer import Tokenizer, default_tokenizer_path

# The tiny config reads demo_output/data and writes runs/tiny-finetune, relative to the repository root.
CONFIG = Path("configs/tiny/finetune.yaml")
LORA_CONFIG = Path("configs/tiny/lora.yaml")
DATA_DIR = Path("demo_output")
RUN_DIR = Path("runs/tiny-finetune")
LORA_RUN_DIR = Path("runs/tiny-lora")


def heldout_accuracy(model: Mistral, tokenizer: Tokenizer, rows: list[dict]) -> tuple[float, list[tuple]]:
    """Exact match of greedy answers (up to the first newline) against the expected outputs."""
    prompts = [tokenizer.encode(alpaca_prompt(row["instruction"], row["input"]), bos=True) for row in rows]
    answers = generate(model, prompts, max_new_tokens=16, eos_id=tokenizer.eos_id)
    examples = []
    for row, ids in zip(rows, answers):
        text = tokenizer.decode([i for i in ids if i != tokenizer.eos_id]).strip().split("\n")[0].strip()
        examples.append((row["instruction"], row["input"], row["output"], text))
    correct = sum(expected == got for *_, expected, got in examples)
    return correct / len(rows), examples


def untrained_model(seed: int) -> Mistral:
    """A randomly initialised model of the config's architecture: the baseline before fine-tuning."""
    torch.manual_seed(seed)
    model = Mistral(MistralConfig(**yaml.safe_load(CONFIG.read_text())["model"]["model_config"]))
    model.init_weights()
    return model.eval()


def _config_for(config: Path, max_steps: int | None) -> Path:
    """`config` itself, or for a shortened run a copy of it that stops after `max_steps` and validates and
    checkpoints halfway, as the full run does (the LoRA leg starts from that checkpoint)."""
    if max_steps is None:
        return config
    settings = yaml.safe_load(config.read_text())
    trainer = settings["trainer"]
    trainer["max_steps"] = max_steps
    trainer["val_check_interval"] = max(1, max_steps // 2)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith(".ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = max(1, max_steps // 2)
    shortened = DATA_DIR / f"{config.stem}-{max_steps}-steps.yaml"
    shortened.write_text(yaml.safe_dump(settings, sort_keys=False))
    return shortened


def _command(argv: list[str]) -> None:
    """Run one `mistral-lightning` command as a user would; a failure stops the demo. `fit` runs in its own
    process, so that each run's peak memory (the process's peak RSS on the CPU) is its own."""
    if argv[0] == "fit":
        failed = subprocess.run(
            python_module_command("mistral_lightning", *argv), env=safe_path_env()
        ).returncode
    else:
        failed = cli_main(argv)
    if failed:
        raise RuntimeError(f"mistral-lightning {argv[0]} failed in the demo; see its error above")


@dataclass(frozen=True)
class RunScores:
    """One fine-tuning method's row of the LoRA comparison."""

    heldout: float
    mmlu: float
    trainable_params: int
    peak_memory_mib: float
    tokens_per_sec: float


@dataclass(frozen=True)
class DemoScores:
    heldout_before: float
    heldout_after: float
    mmlu_before: float
    mmlu_after: float
    # From the full run's first checkpoint: that checkpoint itself, then full and LoRA fine-tuning onwards.
    start: RunScores | None = None
    full: RunScores | None = None
    lora: RunScores | None = None

    def learned(self) -> bool:
        """The demo's claim for a full-length run: the fine-tuned model beats the untrained one on held-out
        prompts, and chance on 200 synthetic MMLU questions by over three standard deviations (0.25 +- 0.03)."""
        return self.heldout_after > self.heldout_before and self.mmlu_after > 0.35


def run_summary(run_dir: Path) -> dict[str, float]:
    """The `summary/*` row the throughput monitor logged at the end of a run (the CSV logger's metrics)."""
    (metrics,) = run_dir.glob("lightning_logs/version_*/metrics.csv")
    summary: dict[str, float] = {}
    with metrics.open() as rows:
        for row in csv.DictReader(rows):
            summary.update(
                {key: float(value) for key, value in row.items() if key.startswith("summary/") and value}
            )
    return summary


def first_checkpoint(run_dir: Path) -> tuple[Path, int]:
    """The full run's earliest step checkpoint (the LoRA run starts from its weights) and its step."""
    by_step = {
        int(path.name.split("step=")[1].split(".")[0]): path for path in run_dir.glob("checkpoints/*step=*")
    }
    step = min(by_step)
    return by_step[step], step


def lora_trainable_parameters() -> int:
    """What the LoRA config trains: its adapters applied to the config's architecture, counted."""
    settings = yaml.safe_load(LORA_CONFIG.read_text())["model"]
    with torch.device("meta"):
        model = Mistral(MistralConfig(**settings["model_config"]))
    apply_lora(model, LoRAConfig(**settings["lora"]))
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def scores(model: Mistral, tokenizer: Tokenizer, rows: list[dict], mmlu: Path) -> tuple[float, float]:
    """Held-out exact match and synthetic 5-shot MMLU accuracy."""
    return heldout_accuracy(model, tokenizer, rows)[0], evaluate_mmlu(model, tokenizer, mmlu)["accuracy"]


def compare_lora(
    tokenizer: Tokenizer,
    rows: list[dict],
    mmlu: Path,
    full_scores: tuple[float, float],
    full_params: int,
    shortened: bool,
) -> tuple[RunScores, ...]:
    """From the full run's first checkpoint, LoRA trains for the steps the full run went on; all three scored."""
    checkpoint, start_step = first_checkpoint(RUN_DIR)
    full_summary = run_summary(RUN_DIR)
    total_steps = int(full_summary["summary/iterations"])
    start_dir, lora_dir = DATA_DIR / f"hf-step{start_step}", DATA_DIR / "hf-lora"
    _command(["export", "--checkpoint", str(checkpoint), "--out", str(start_dir), "--dtype", "float32"])
    print(
        f"== 6b. LoRA from step {start_step} for {total_steps - start_step} steps (fit --config {LORA_CONFIG})"
    )
    _command(
        [
            "fit",
            "--config",
            str(_config_for(LORA_CONFIG, total_steps - start_step if shortened else None)),
            "--model.pretrained",
            str(start_dir),
            "--trainer.max_steps",
            str(total_steps - start_step),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    # The LoRA run's last checkpoint holds the adapters only; `export` merges them into the start weights.
    lora_checkpoint = LORA_RUN_DIR / "checkpoints" / "last.ckpt"
    _command(["export", "--checkpoint", str(lora_checkpoint), "--out", str(lora_dir), "--dtype", "float32"])
    lora_summary = run_summary(LORA_RUN_DIR)
    start_model = Mistral.from_pretrained(start_dir).eval()
    lora_model = Mistral.from_pretrained(lora_dir).eval()

    def row(accuracies: tuple[float, float], trainable: int, summary: dict[str, float]) -> RunScores:
        peak, rate = summary["summary/peak_memory_mib"], summary["summary/tokens_per_sec_per_device"]
        return RunScores(*accuracies, trainable, peak, rate)

    return (
        RunScores(*scores(start_model, tokenizer, rows, mmlu), 0, float("nan"), float("nan")),
        row(full_scores, full_params, full_summary),
        row(scores(lora_model, tokenizer, rows, mmlu), lora_trainable_parameters(), lora_summary),
    )


def run(max_steps: int | None = None, heldout: int = 100, lora: bool = True) -> DemoScores:
    """Every step of the demo, from the current directory (the repository root); returns the scores."""
    out = DATA_DIR
    for folder in (DATA_DIR, RUN_DIR, LORA_RUN_DIR):
        shutil.rmtree(folder, ignore_errors=True)
    # Trained from scratch, the model has no tokenizer of its own: it is the one the demo's data is tokenized with.
    tokenizer_path = default_tokenizer_path()
    tokenizer = Tokenizer(tokenizer_path)

    print("== 1. synthetic data (mistral-lightning demo-data)")
    paths = write_demo_data(out / "raw")
    print("== 2. tokenize into Megatron indexed datasets (mistral-lightning preprocess)")
    preprocess = ["preprocess", "--input", str(paths.train), "--tokenizer-model", str(tokenizer_path)]
    preprocess += [
        "--output-prefix",
        str(out / "data" / "alpaca"),
        "--handler-name",
        "GeneralInstructionHandler",
    ]
    _command([*preprocess, "--append-eod", "--log-interval", "100000"])

    print(f"== 3. fine-tune a 9M-parameter Mistral on CPU (mistral-lightning fit --config {CONFIG})")
    fit = [
        "fit",
        "--config",
        str(_config_for(CONFIG, max_steps)),
        "--trainer.enable_progress_bar",
        "false",
        "--export_hf_dir",
        str(out / "hf"),
        # The 9M-parameter demo model is scored as trained; a 7B export keeps the default bf16.
        "--export_hf_dtype",
        "float32",
    ]
    _command(fit)

    print("== 4. held-out prompts, greedy, exact match")
    rows = pq.read_table(paths.heldout).to_pylist()[:heldout]
    before, _ = heldout_accuracy(untrained_model(seed=1234), tokenizer, rows)
    trained = Mistral.from_pretrained(out / "hf").eval()
    tokenizer.check_fits(trained.config.vocab_size, out / "hf")
    after, examples = heldout_accuracy(trained, tokenizer, rows)
    for instruction, given, expected, got in examples[:6]:
        mark = "ok " if expected == got else "err"
        print(f"  [{mark}] {instruction} {given!r} -> {got!r} (expected {expected!r})")

    print("== 5. 5-shot MMLU on the synthetic set (mistral-lightning evaluate)")
    mmlu_before = evaluate_mmlu(untrained_model(seed=1234), tokenizer, paths.mmlu)["accuracy"]
    mmlu_after = evaluate_mmlu(trained, tokenizer, paths.mmlu)["accuracy"]
    if not lora:
        return DemoScores(before, after, mmlu_before, mmlu_after)
    print("== 6. LoRA next to full fine-tuning, from the full run's first checkpoint")
    full_params = sum(param.numel() for param in trained.parameters())
    start, full, adapted = compare_lora(
        tokenizer, rows, paths.mmlu, (after, mmlu_after), full_params, shortened=max_steps is not None
    )
    return DemoScores(before, after, mmlu_before, mmlu_after, start, full, adapted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mistral_lightning.demo", description=__doc__)
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's trainer.max_steps")
    parser.add_argument("--heldout", type=int, default=100, help="held-out prompts to answer")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA comparison")
    args = parser.parse_args(argv)
    if not CONFIG.is_file():
        parser.error(f"{CONFIG} not found; run the demo from the repository root (make demo)")
    scores = run(args.max_steps, args.heldout, lora=not args.no_lora)
    print("\n| model | held-out exact match | synthetic MMLU (chance 0.25) |")
    print("| --- | --- | --- |")
    print(f"| untrained | {scores.heldout_before:.2f} | {scores.mmlu_before:.2f} |")
    print(f"| fine-tuned | {scores.heldout_after:.2f} | {scores.mmlu_after:.2f} |")
    if scores.lora is not None:
        print(
            "\n| from the first checkpoint | held-out exact match | synthetic MMLU | trainable parameters "
            "| peak memory (MiB) | tokens/s |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        start = scores.start
        print(f"| first checkpoint, as it is | {start.heldout:.2f} | {start.mmlu:.2f} | - | - | - |")
        for name, result in (("+ full fine-tuning", scores.full), ("+ LoRA", scores.lora)):
            print(
                f"| {name} | {result.heldout:.2f} | {result.mmlu:.2f} | {result.trainable_params:,} "
                f"| {result.peak_memory_mib:.0f} | {result.tokens_per_sec:.0f} |"
            )
    if args.max_steps is None and not scores.learned():
        print("demo: the fine-tuned model did not beat the untrained one and chance (0.35) on synthetic MMLU")
        return 1
    return 0
