"""What the subcommands' parsers share, without torch, so that `mistral-lightning <command> --help` starts fast.

Each command builds its parser from torch-free modules and imports the model stack only after parsing.
"""

from __future__ import annotations

import argparse

# The names config.DTYPES maps to torch dtypes (short and torch spellings), for `choices` before torch loads.
DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except None: an unset option's help says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)
