"""`make demo`: the whole product on a laptop CPU, in a few minutes.

synthetic Alpaca-style data -> `preprocess` -> `fit` the tiny preset (printing the recipe's
throughput/memory row) -> HF export -> greedy answers to held-out prompts and 5-shot MMLU on the
synthetic set, for the untrained and the fine-tuned model side by side. Then LoRA next to full
fine-tuning: from the full run's first checkpoint, LoRA adapters train for as many steps as the full run
went on, on the same data, and both are scored with their trainable parameters, peak memory and
tokens/s. Last, DPO over the fine-tuned model on synthetic preference pairs (a right and a near-miss answer):
how often held-out pairs rank the right answer first, and how likely each side is, before and after.
Everything goes through the same commands and functions a user calls; nothing is downloaded.

Everything it writes goes under its own folder (`--out`, default demo_output/make-demo), never into the
demo_output/data and runs/ folders the tiny configs use: it runs copies of those configs pointed there.
The folder carries a marker file, and the next demo replaces only a folder that carries it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
import subprocess
import sys
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
from mistral_lightning.demo.preference import PairRanking, rank_pairs
from mistral_lightning.errors import UserError
from mistral_lightning.evaluation.mmlu import evaluate_mmlu
from mistral_lightning.outputs import NewFile, user_path
from mistral_lightning.prompts import alpaca_prompt
from mistral_lightning.tokenizer import Tokenizer, default_tokenizer_path

# The demo runs copies of these, relative to the repository root, with every path moved under its folder.
CONFIG = Path("configs/tiny/finetune.yaml")
LORA_CONFIG = Path("configs/tiny/lora.yaml")
DPO_CONFIG = Path("configs/tiny/dpo.yaml")
OUT_DIR = Path("demo_output/make-demo")
# In the demo's folder: what makes it the demo's own, so that the next demo may replace it.
MARKER = ".written-by-make-demo"


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo writes, all under `out`."""

    out: Path

    @property
    def raw(self) -> Path:
        return self.out / "raw"

    @property
    def data_prefix(self) -> Path:
        return self.out / "data" / "alpaca"

    @property
    def hf(self) -> Path:
        return self.out / "hf"

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / "tiny-finetune"

    @property
    def lora_run_dir(self) -> Path:
        return self.out / "runs" / "tiny-lora"

    @property
    def preference_prefix(self) -> Path:
        return self.out / "data" / "preference"

    @property
    def preference_heldout_prefix(self) -> Path:
        return self.out / "data" / "preference-heldout"

    @property
    def dpo_run_dir(self) -> Path:
        return self.out / "runs" / "tiny-dpo"

    @property
    def dpo_hf(self) -> Path:
        return self.out / "hf-dpo"


class DemoOutputError(UserError):
    """The demo's --out folder holds files the demo did not write."""


def fresh_output(out: Path) -> None:
    """Make `out` the demo's empty folder: a previous demo's (it holds MARKER) is removed, a folder with
    anything else in it is refused before anything is written."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DemoOutputError(f"--out {out}: exists and is not a folder; choose a folder for the demo")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoOutputError(
                f"--out {out}: holds files the demo did not write (it has no {MARKER}); move them away or "
                "choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with NewFile(out / MARKER, "w") as stream:
        stream.write("written by make demo: the next make demo replaces this folder\n")


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


def demo_config(
    config: Path, paths: DemoPaths, run_dir: Path, max_steps: int | None, data_prefix: Path | None = None
) -> Path:
    """A copy of `config` in the demo's folder that reads the demo's data (`data_prefix`, by default the
    instruction data) and writes under `run_dir`; for a shortened run it stops after `max_steps` and validates
    and checkpoints halfway, as the full run does (the LoRA leg starts from that checkpoint)."""
    settings = yaml.safe_load(config.read_text())
    trainer = settings["trainer"]
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"]["init_args"]["save_dir"] = str(run_dir)
    settings["data"]["init_args"]["data_prefix"] = str(data_prefix or paths.data_prefix)
    (checkpoints,) = [c for c in trainer["callbacks"] if c["class_path"].endswith(".ModelCheckpoint")]
    checkpoints["init_args"]["dirpath"] = str(run_dir / "checkpoints")
    if max_steps is not None:
        trainer["max_steps"] = max_steps
        trainer["val_check_interval"] = max(1, max_steps // 2)
        checkpoints["init_args"]["every_n_train_steps"] = max(1, max_steps // 2)
    copy = paths.out / config.name
    with NewFile(copy, "w") as stream:
        yaml.safe_dump(settings, stream, sort_keys=False)
    return copy


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
    # Held-out preference pairs as the fine-tuned model ranks them, and after DPO over it.
    before_dpo: PairRanking | None = None
    after_dpo: PairRanking | None = None

    def learned(self) -> bool:
        """The demo's claim for a full-length run: the fine-tuned model beats the untrained one on held-out
        prompts, and chance on 200 synthetic MMLU questions by over three standard deviations (0.25 +- 0.03);
        after DPO, more held-out pairs rank the right answer first than before it."""
        dpo_learned = self.after_dpo is None or self.after_dpo.chosen_first > self.before_dpo.chosen_first
        return self.heldout_after > self.heldout_before and self.mmlu_after > 0.35 and dpo_learned


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
    paths: DemoPaths,
    tokenizer: Tokenizer,
    rows: list[dict],
    mmlu: Path,
    full_scores: tuple[float, float],
    full_params: int,
    shortened: bool,
) -> tuple[RunScores, ...]:
    """From the full run's first checkpoint, LoRA trains for the steps the full run went on; all three scored."""
    checkpoint, start_step = first_checkpoint(paths.run_dir)
    full_summary = run_summary(paths.run_dir)
    total_steps = int(full_summary["summary/iterations"])
    start_dir, lora_dir = paths.out / f"hf-step{start_step}", paths.out / "hf-lora"
    lora_steps = total_steps - start_step
    _command(["export", "--checkpoint", str(checkpoint), "--out", str(start_dir), "--dtype", "float32"])
    print(f"== 6b. LoRA from step {start_step} for {lora_steps} steps (fit --config {LORA_CONFIG})")
    _command(
        [
            "fit",
            "--config",
            str(demo_config(LORA_CONFIG, paths, paths.lora_run_dir, lora_steps if shortened else None)),
            "--model.pretrained",
            str(start_dir),
            "--trainer.max_steps",
            str(lora_steps),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    # The LoRA run's last checkpoint holds the adapters only; `export` merges them into the start weights.
    lora_checkpoint = paths.lora_run_dir / "checkpoints" / "last.ckpt"
    _command(["export", "--checkpoint", str(lora_checkpoint), "--out", str(lora_dir), "--dtype", "float32"])
    lora_summary = run_summary(paths.lora_run_dir)
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


def dpo_leg(paths: DemoPaths, data, tokenizer_path: Path, max_steps: int | None) -> tuple[PairRanking, ...]:
    """DPO over the fine-tuned model (its HF export) on the preference pairs; held-out pairs ranked by both."""
    for rows, prefix in (
        (data.preference_train, paths.preference_prefix),
        (data.preference_heldout, paths.preference_heldout_prefix),
    ):
        _command(
            [
                "preprocess",
                "--input",
                str(rows),
                "--tokenizer-model",
                str(tokenizer_path),
                "--output-prefix",
                str(prefix),
            ]
            + ["--handler", "preference", "--log-interval", "100000"]
        )
    print(f"== 7b. DPO over the fine-tuned model (mistral-lightning fit --config {DPO_CONFIG})")
    config = demo_config(DPO_CONFIG, paths, paths.dpo_run_dir, max_steps, data_prefix=paths.preference_prefix)
    _command(
        [
            "fit",
            "--config",
            str(config),
            "--model.pretrained",
            str(paths.hf),
            "--trainer.enable_progress_bar",
            "false",
        ]
        + ["--export_hf_dir", str(paths.dpo_hf), "--export_hf_dtype", "float32"]
    )
    seq_length = yaml.safe_load(DPO_CONFIG.read_text())["data"]["init_args"]["seq_length"]
    return tuple(
        rank_pairs(Mistral.from_pretrained(folder).eval(), paths.preference_heldout_prefix, seq_length)
        for folder in (paths.hf, paths.dpo_hf)
    )


def run(
    max_steps: int | None = None,
    heldout: int = 100,
    lora: bool = True,
    out: Path = OUT_DIR,
    mmlu_per_subject: int = 50,
    dpo: bool = True,
    dpo_steps: int | None = None,
) -> DemoScores:
    """Every step of the demo, from the current directory (the repository root), writing under `out` only;
    returns the scores. `mmlu_per_subject`: synthetic MMLU test questions per subject (4 subjects); `dpo_steps`:
    the DPO leg's steps (default: its config's)."""
    paths = DemoPaths(Path(out))
    fresh_output(paths.out)
    # Trained from scratch, the model has no tokenizer of its own: it is the one the demo's data is tokenized with.
    tokenizer_path = default_tokenizer_path()
    tokenizer = Tokenizer(tokenizer_path)

    print("== 1. synthetic data (mistral-lightning demo-data)")
    data = write_demo_data(paths.raw, mmlu_test_per_subject=mmlu_per_subject)
    print("== 2. tokenize into Megatron indexed datasets (mistral-lightning preprocess)")
    preprocess = ["preprocess", "--input", str(data.train), "--tokenizer-model", str(tokenizer_path)]
    preprocess += [
        "--output-prefix",
        str(paths.data_prefix),
        "--handler-name",
        "GeneralInstructionHandler",
    ]
    _command([*preprocess, "--append-eod", "--log-interval", "100000"])

    print(f"== 3. fine-tune a 9M-parameter Mistral on CPU (mistral-lightning fit --config {CONFIG})")
    fit = [
        "fit",
        "--config",
        str(demo_config(CONFIG, paths, paths.run_dir, max_steps)),
        "--trainer.enable_progress_bar",
        "false",
        "--export_hf_dir",
        str(paths.hf),
        # The 9M-parameter demo model is scored as trained; a 7B export keeps the default bf16.
        "--export_hf_dtype",
        "float32",
    ]
    _command(fit)

    print("== 4. held-out prompts, greedy, exact match")
    rows = pq.read_table(data.heldout).to_pylist()[:heldout]
    before, _ = heldout_accuracy(untrained_model(seed=1234), tokenizer, rows)
    trained = Mistral.from_pretrained(paths.hf).eval()
    tokenizer.check_fits(trained.config.vocab_size, paths.hf)
    after, examples = heldout_accuracy(trained, tokenizer, rows)
    for instruction, given, expected, got in examples[:6]:
        mark = "ok " if expected == got else "err"
        print(f"  [{mark}] {instruction} {given!r} -> {got!r} (expected {expected!r})")

    print("== 5. 5-shot MMLU on the synthetic set (mistral-lightning evaluate)")
    mmlu_before = evaluate_mmlu(untrained_model(seed=1234), tokenizer, data.mmlu)["accuracy"]
    mmlu_after = evaluate_mmlu(trained, tokenizer, data.mmlu)["accuracy"]
    scores = DemoScores(before, after, mmlu_before, mmlu_after)
    if lora:
        print("== 6. LoRA next to full fine-tuning, from the full run's first checkpoint")
        full_params = sum(param.numel() for param in trained.parameters())
        start, full, adapted = compare_lora(
            paths,
            tokenizer,
            rows,
            data.mmlu,
            (after, mmlu_after),
            full_params,
            shortened=max_steps is not None,
        )
        scores = dataclasses.replace(scores, start=start, full=full, lora=adapted)
    if dpo:
        print("== 7. DPO over the fine-tuned model on preference pairs (preprocess --handler preference)")
        before_dpo, after_dpo = dpo_leg(paths, data, tokenizer_path, dpo_steps)
        scores = dataclasses.replace(scores, before_dpo=before_dpo, after_dpo=after_dpo)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mistral_lightning.demo", description=__doc__)
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's trainer.max_steps")
    parser.add_argument("--heldout", type=int, default=100, help="held-out prompts to answer")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA comparison")
    parser.add_argument("--no-dpo", action="store_true", help="skip the DPO leg")
    parser.add_argument(
        "--out",
        type=user_path,
        default=str(OUT_DIR),
        help=f"the demo's own folder: everything it writes goes there, and a folder without {MARKER} is refused",
    )
    args = parser.parse_args(argv)
    if not CONFIG.is_file():
        parser.error(f"{CONFIG} not found; run the demo from the repository root (make demo)")
    try:
        scores = run(
            args.max_steps, args.heldout, lora=not args.no_lora, out=Path(args.out), dpo=not args.no_dpo
        )
    except DemoOutputError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
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
    if scores.after_dpo is not None:
        print(
            "\n| held-out preference pairs | right answer ranked first | log p(right answer) | log p(near miss) |"
        )
        print("| --- | --- | --- | --- |")
        for name, ranking in (("fine-tuned", scores.before_dpo), ("+ DPO", scores.after_dpo)):
            print(
                f"| {name} | {ranking.chosen_first:.2f} | {ranking.chosen_log_prob:.2f} "
                f"| {ranking.rejected_log_prob:.2f} |"
            )
    if args.max_steps is None and not scores.learned():
        print(
            "demo: the fine-tuned model did not beat the untrained one and chance (0.35) on synthetic MMLU, or DPO "
            "did not rank more held-out pairs right"
        )
        return 1
    return 0
