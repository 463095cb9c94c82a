"""`make demo`: the whole product on a laptop CPU, in a few minutes.

synthetic Alpaca-style data -> `preprocess` -> `fit` the tiny preset (printing the recipe's
throughput/memory row) -> HF export -> greedy answers to held-out prompts and 5-shot MMLU on the
synthetic set, for the untrained and the fine-tuned model side by side. Everything goes through the
same commands and functions a user calls; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from mistral_lightning import Mistral, MistralConfig, generate
from mistral_lightning.cli import main as cli_main
from mistral_lightning.demo_data import write_demo_data
from mistral_lightning.evaluation.mmlu import evaluate_mmlu
from mistral_lightning.prompts import alpaca_prompt
from mistral_lightning.tokenizer import Tokenizer, default_tokenizer_path

# The tiny config reads demo_output/data and writes runs/tiny-finetune, relative to the repository root.
CONFIG = Path("configs/tiny/finetune.yaml")
DATA_DIR = Path("demo_output")
RUN_DIR = Path("runs/tiny-finetune")


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


def _command(argv: list[str]) -> None:
    """Run one `mistral-lightning` command as a user would; a failure stops the demo."""
    if cli_main(argv):
        raise RuntimeError(f"mistral-lightning {argv[0]} failed in the demo; see its error above")


@dataclass(frozen=True)
class DemoScores:
    heldout_before: float
    heldout_after: float
    mmlu_before: float
    mmlu_after: float


def run(max_steps: int | None = None, heldout: int = 100) -> DemoScores:
    """Every step of the demo, from the current directory (the repository root); returns the scores."""
    out = DATA_DIR
    for folder in (DATA_DIR, RUN_DIR):
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
        str(CONFIG),
        "--trainer.enable_progress_bar",
        "false",
        "--export_hf_dir",
        str(out / "hf"),
        # The 9M-parameter demo model is scored as trained; a 7B export keeps the default bf16.
        "--export_hf_dtype",
        "float32",
    ]
    if max_steps:
        fit += ["--trainer.max_steps", str(max_steps)]
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
    return DemoScores(before, after, mmlu_before, mmlu_after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mistral_lightning.demo", description=__doc__)
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's trainer.max_steps")
    parser.add_argument("--heldout", type=int, default=100, help="held-out prompts to answer")
    args = parser.parse_args(argv)
    if not CONFIG.is_file():
        parser.error(f"{CONFIG} not found; run the demo from the repository root (make demo)")
    scores = run(args.max_steps, args.heldout)
    print("\n| model | held-out exact match | synthetic MMLU (chance 0.25) |")
    print("| --- | --- | --- |")
    print(f"| untrained | {scores.heldout_before:.2f} | {scores.mmlu_before:.2f} |")
    print(f"| fine-tuned | {scores.heldout_after:.2f} | {scores.mmlu_after:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
