"""The `mistral-lightning` entry point: one command, one subcommand per job.

Each subcommand lives in its own module exposing `main(argv) -> int | None`; they are
imported lazily so that `mistral-lightning preprocess --help` does not pay for Lightning.
"""

from __future__ import annotations

import importlib
import sys

from mistral_lightning.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("mistral_lightning.data.preprocess", "tokenize raw data into Megatron indexed datasets"),
    "demo-data": (
        "mistral_lightning.data.demo_data",
        "write synthetic Alpaca-style and MMLU-style demo data",
    ),
    "convert": (
        "mistral_lightning.checkpoint.convert",
        "convert checkpoints between HF, Megatron/ModelLink and training checkpoints",
    ),
}


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
        return int(module.main(rest) or 0)
    except UserError as err:
        print(f"mistral-lightning {command}: error: {err}", file=sys.stderr)
        return 2
