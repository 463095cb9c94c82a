"""The `mistral-lightning` entry point: one command, one subcommand per job.

Each subcommand lives in its own module exposing `main(argv) -> int | None`; they are
imported lazily so that `mistral-lightning preprocess --help` does not pay for Lightning.
"""

from __future__ import annotations

import importlib
import sys

from mistral_lightning.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("mistral_lightning.train_cli", "pretrain or fine-tune (LightningCLI: --config configs/...yaml)"),
    "validate": (
        "mistral_lightning.train_cli",
        "validation loss and perplexity of a checkpoint (LightningCLI)",
    ),
    "test": ("mistral_lightning.train_cli", "test loss and perplexity of a checkpoint (LightningCLI)"),
    "predict": (
        "mistral_lightning.train_cli",
        "greedy generation over a datamodule's predict set (LightningCLI)",
    ),
    "plan": (
        "mistral_lightning.plan_cli",
        "a fit config's memory per device, simulated without allocating it (FakeTensorMode)",
    ),
    "generate": (
        "mistral_lightning.generation.cli",
        "generate text or chat from a checkpoint (KV-cache decoding)",
    ),
    "evaluate": ("mistral_lightning.evaluation.cli", "MMLU accuracy per subject and overall (--task mmlu)"),
    "export": (
        "mistral_lightning.export",
        "write a training checkpoint (DCP folder or .ckpt) as an HF folder",
    ),
    "preprocess": (
        "mistral_lightning.data.preprocess.cli",
        "tokenize raw data into Megatron indexed datasets",
    ),
    "demo-data": (
        "mistral_lightning.demo_data",
        "write synthetic Alpaca-style and MMLU-style demo data",
    ),
    "convert": (
        "mistral_lightning.checkpoint.convert",
        "convert checkpoints between HF, Megatron/ModelLink and training checkpoints",
    ),
}
# LightningCLI parses the subcommand itself, so these get it back in front of their arguments.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return f"usage: mistral-lightning <command> [options]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"mistral-lightning: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        return int(module.main([command, *rest] if command in LIGHTNING_SUBCOMMANDS else rest) or 0)
    except UserError as err:
        print(f"mistral-lightning {command}: error: {err}", file=sys.stderr)
        return 2
