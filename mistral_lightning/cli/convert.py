"""`mistral-lightning convert`: HF safetensors <-> Megatron/ModelLink at any TP/PP, and `fit` checkpoints -> both.

The conversion itself is checkpoint/conversion.py; this module is the command's options, torch-free so
that `--help` is quick. The recipe's ModelLink spellings are accepted too (`--loader llama2_hf`,
`--model-type GPT`, `--tokenizer-model`, `--save-model-type save_huggingface_llama`, which writes
`<save-dir>/mg2hg/` as ModelLink does).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields

from mistral_lightning.checkpoint.formats import LOADERS, MG2HG, SAVERS, ConversionSettings
from mistral_lightning.cli.options import DefaultsHelpFormatter, add_trust_checkpoint
from mistral_lightning.option_values import DTYPE_NAMES
from mistral_lightning.outputs import user_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning convert",
        description="Convert Mistral checkpoints between HF safetensors, the Megatron/ModelLink layout "
        "(any TP/PP) and this product's training checkpoints.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--loader",
        required=True,
        default=argparse.SUPPRESS,
        choices=list(LOADERS),
        help="source format (llama2_hf is the recipe's hf)",
    )
    parser.add_argument(
        "--saver", required=True, default=argparse.SUPPRESS, choices=list(SAVERS), help="target format"
    )
    parser.add_argument(
        "--load-dir",
        type=user_path,
        required=True,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="source folder (a .ckpt file or DCP folder for --loader lightning)",
    )
    parser.add_argument(
        "--save-dir",
        type=user_path,
        required=True,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="target folder; written under a temporary name first",
    )
    parser.add_argument(
        "--target-tensor-parallel-size",
        type=int,
        metavar="N",
        help="TP of the Megatron output (default: the source's, or 1)",
    )
    parser.add_argument(
        "--target-pipeline-parallel-size",
        type=int,
        metavar="N",
        help="PP of the Megatron output (default: the source's, or 1)",
    )
    parser.add_argument(
        "--params-dtype",
        "--dtype",
        dest="params_dtype",
        choices=list(DTYPE_NAMES),
        help="dtype of the saved weights, named in the HF config.json (default: the dtype an HF or Megatron "
        "source is stored in; bfloat16, as Mistral releases its weights, for a training checkpoint)",
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        metavar="N",
        help="Megatron pads the vocabulary to a multiple of this x TP (default: the source's, or 1 as in ModelLink)",
    )
    parser.add_argument(
        "--model-config",
        type=user_path,
        metavar="PRESET_OR_HF_DIR",
        help="preset name or HF folder/config.json describing the model; needed by --loader lightning when no "
        "config.json sits next to the checkpoint, and overrides a Megatron checkpoint's args",
    )
    parser.add_argument(
        "--max-shard-size-gb",
        type=float,
        metavar="GB",
        default=ConversionSettings.max_shard_size_gb,
        help="HF saver: largest safetensors file (up to one is held in memory while writing)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a --save-dir that holds a previous output of the same format (and nothing else)",
    )
    add_trust_checkpoint(parser, ".pt/.ckpt files")
    recipe = parser.add_argument_group("ModelLink spellings (accepted for the recipe's command lines)")
    recipe.add_argument("--model-type", choices=["GPT"], default="GPT", help="always GPT")
    recipe.add_argument(
        "--tokenizer-model",
        metavar="FILE",
        help="unused: the vocabulary size comes from config.json or the Megatron args",
    )
    recipe.add_argument(
        "--save-model-type",
        choices=["megatron", "save_huggingface_llama"],
        default=ConversionSettings.save_model_type,
        help=f"save_huggingface_llama: write HF weights into <save-dir>/{MG2HG}, config from <save-dir>",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    print(f"converting {args.loader} {args.load_dir} -> {args.saver} {args.save_dir}", flush=True)
    from mistral_lightning.checkpoint.conversion import convert

    out_dir = convert(
        ConversionSettings(**{field.name: getattr(args, field.name) for field in fields(ConversionSettings)})
    )
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
