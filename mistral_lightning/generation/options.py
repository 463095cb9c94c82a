"""The options every inference command (generate, evaluate, serve) shares; torch-free, for a fast `--help`."""

from __future__ import annotations

import argparse

from mistral_lightning.cli_options import DTYPE_NAMES

AUTO_DTYPE = "auto"  # keep the checkpoint's own dtype
AUTO_DEVICE = "auto"  # resolved after parsing by loading.resolve_device: cuda, else npu, else cpu


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every inference command shares."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        default=argparse.SUPPRESS,
        help="HF model folder, or a `fit` checkpoint (DCP folder or .ckpt)",
    )
    parser.add_argument(
        "--adapter",
        help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for the --checkpoint "
        "base, merged into its weights; a LoRA fit checkpoint brings its own adapters and needs none",
    )
    parser.add_argument(
        "--tokenizer",
        "--tokenizer-model",
        dest="tokenizer_model",
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
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a `fit` checkpoint with full unpickling, running any code it holds (only checkpoints you trust)",
    )
