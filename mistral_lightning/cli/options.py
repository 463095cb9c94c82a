"""What the subcommands' parsers share, without torch, so that `mistral-lightning <command> --help` starts fast.

Each command builds its parser from torch-free modules and imports the model stack only after parsing.
"""

from __future__ import annotations

import argparse
from typing import Any

from mistral_lightning.generation.settings import InferenceSettings
from mistral_lightning.option_values import AUTO_DEVICE, AUTO_DTYPE, DTYPE_NAMES
from mistral_lightning.outputs import user_path


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except None: an unset option's help says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every inference command shares."""
    parser.add_argument(
        "--checkpoint",
        type=user_path,
        required=True,
        default=argparse.SUPPRESS,
        help="HF model folder, or a `fit` checkpoint (DCP folder or .ckpt)",
    )
    parser.add_argument(
        "--adapter",
        type=user_path,
        help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for the --checkpoint "
        "base, merged into its weights; a LoRA fit checkpoint brings its own adapters and needs none",
    )
    parser.add_argument(
        "--tokenizer",
        "--tokenizer-model",
        dest="tokenizer_model",
        type=user_path,
        help="a tokenizer file (tokenizer.model[.vN], tekken*.json, tokenizer.json) or an HF folder; default: "
        "the checkpoint's own (its HF folder, or the model.pretrained folder of a fit checkpoint), else Mistral v1",
    )
    parser.add_argument(
        "--device",
        default=AUTO_DEVICE,
        help="cpu, cuda[:N] or npu[:N]; auto: cuda if available, else npu if torch_npu sees one, else cpu",
    )
    parser.add_argument(
        "--dtype",
        choices=[AUTO_DTYPE, *DTYPE_NAMES],
        default=AUTO_DTYPE,
        help="dtype of the loaded weights; auto: the checkpoint's own",
    )
    add_trust_checkpoint(parser, "a `fit` checkpoint")


def add_trust_checkpoint(parser: Any, loaded: str) -> None:
    """`--trust-checkpoint`, for every command that reads checkpoints (argparse or LightningCLI's parser)."""
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help=f"load {loaded} with full unpickling, running any code it holds (only checkpoints you trust)",
    )


def inference_settings(args: argparse.Namespace, device: str | None = None) -> InferenceSettings:
    """The options of `add_model_arguments` as the loader takes them; `device` overrides --device (a rank's)."""
    return InferenceSettings(
        args.checkpoint,
        args.adapter,
        args.tokenizer_model,
        device or args.device,
        args.dtype,
        args.trust_checkpoint,
    )
