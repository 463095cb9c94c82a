"""The `mistral-lightning` entry point: one command, one subcommand per job.

Each subcommand lives in its own module exposing `main(argv) -> int | None`; they are
imported lazily so that `mistral-lightning preprocess --help` does not pay for Lightning.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
import warnings

from mistral_lightning.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("mistral_lightning.cli.fit", "pretrain or fine-tune (LightningCLI: --config configs/...yaml)"),
    "validate": (
        "mistral_lightning.cli.fit",
        "validation loss and perplexity of a checkpoint (LightningCLI)",
    ),
    "test": ("mistral_lightning.cli.fit", "test loss and perplexity of a checkpoint (LightningCLI)"),
    "predict": (
        "mistral_lightning.cli.fit",
        "greedy generation over a datamodule's predict set (LightningCLI)",
    ),
    "plan": (
        "mistral_lightning.cli.plan",
        "a fit config's memory per device, simulated without allocating it (FakeTensorMode)",
    ),
    "generate": (
        "mistral_lightning.cli.generate",
        "generate text or chat from a checkpoint (KV-cache decoding)",
    ),
    "serve": (
        "mistral_lightning.cli.serve",
        "an OpenAI-compatible server (chat completions, completions) on LitServe",
    ),
    "evaluate": ("mistral_lightning.cli.evaluate", "MMLU accuracy per subject and overall (--task mmlu)"),
    "export": (
        "mistral_lightning.cli.export",
        "write a training checkpoint (DCP folder or .ckpt) as an HF folder",
    ),
    "preprocess": (
        "mistral_lightning.cli.preprocess",
        "tokenize raw data into Megatron indexed datasets",
    ),
    "demo-data": (
        "mistral_lightning.cli.demo_data",
        "write synthetic Alpaca-style and MMLU-style demo data",
    ),
    "convert": (
        "mistral_lightning.cli.convert",
        "convert checkpoints between HF, Megatron/ModelLink and training checkpoints",
    ),
    "configs": (
        "mistral_lightning.cli.configs",
        "list the fit configs shipped with the package (fit --config tiny/finetune), or copy them out (--out DIR)",
    ),
}
# LightningCLI parses the subcommand itself, so these get it back in front of their arguments.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# Messages of the libraries underneath that say nothing true or useful about a run, each named exactly.
KNOWN_NOISE_WARNINGS = (
    # Lightning 2.6's CombinedLoader still builds torch's deprecated LeafSpec; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
KNOWN_NOISE_LOGS = {
    # Advertisements for Lightning's cloud logger and model registry, printed at every start.
    "lightning.pytorch.utilities.rank_zero": (
        "Tip: For seamless cloud logging",
        "Tip: For seamless cloud uploads",
    ),
    # torchao registers its Enums with torch's pytree on import; torch 2.13 logs that as deprecated.
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_LOG_FILTERS = {name: _DropMessages(fragments) for name, fragments in KNOWN_NOISE_LOGS.items()}


def silence_known_noise() -> None:
    """Filter KNOWN_NOISE_*; loggers are filtered by name, so neither torch nor Lightning is imported here."""
    for pattern in KNOWN_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, log_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)  # adding the same filter twice keeps one


def version() -> str:
    return importlib.metadata.version("mistral-lightning")


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return (
        f"usage: mistral-lightning <command> [options]\n       mistral-lightning --version\n\n"
        f"commands:\n{rows}\n\n`mistral-lightning <command> --help` lists a command's options and their defaults.\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"mistral-lightning {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"mistral-lightning: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    silence_known_noise()
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        return int(module.main([command, *rest] if command in LIGHTNING_SUBCOMMANDS else rest) or 0)
    except UserError as err:
        print(f"mistral-lightning {command}: error: {err}", file=sys.stderr)
        return 2
