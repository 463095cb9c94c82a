"""`mistral-lightning export`: a training checkpoint (DCP folder or single .ckpt file) -> HF folder.

The HF folder (config.json + safetensors) loads unchanged in `transformers.MistralForCausalLM`.
This is `convert --loader lightning --saver hf` under the training side's option names, saving
bfloat16 unless told otherwise; it streams one parameter at a time. (`fit --export_hf_dir` writes
the live model with `Mistral.save_pretrained`.)
"""

from __future__ import annotations

import argparse

from mistral_lightning.checkpoint import convert
from mistral_lightning.config import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-lightning export", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint: DCP folder or .ckpt file")
    parser.add_argument("--out", required=True, help="HF folder to write (config.json + safetensors)")
    parser.add_argument(
        "--model-config",
        default=None,
        help="preset name or HF folder/config.json; default: the architecture stored in the checkpoint",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="bfloat16", help="dtype of the saved weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    convert_argv = ["--loader", "lightning", "--saver", "hf", "--load-dir", args.checkpoint]
    convert_argv += ["--save-dir", args.out, "--params-dtype", args.dtype]
    if args.model_config is not None:
        convert_argv += ["--model-config", args.model_config]
    if args.overwrite:
        convert_argv.append("--overwrite")
    return convert.main(convert_argv)
