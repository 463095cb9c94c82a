"""`mistral-lightning export`: a training checkpoint (DCP folder or single .ckpt file) -> an HF folder a
server can use as it is.

This is `convert --loader lightning --saver hf` under the training side's option names: the weights in
`--dtype` (bfloat16 unless told otherwise, whatever the training precision), config.json naming it, and
the tokenizer, chat-template and generation files of the `model.pretrained` folder the checkpoint
records, copied unchanged. It streams one parameter at a time; `fit --export_hf_dir` writes through
the same `checkpoint.hf.save_hf`.
"""

from __future__ import annotations

import argparse
import time

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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out folder that holds a previous HF export (and nothing else)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle arbitrary Python objects in the checkpoint (only for checkpoints you trust)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    convert_argv = ["--loader", "lightning", "--saver", "hf", "--load-dir", args.checkpoint]
    convert_argv += ["--save-dir", args.out, "--params-dtype", args.dtype]
    if args.model_config is not None:
        convert_argv += ["--model-config", args.model_config]
    if args.overwrite:
        convert_argv.append("--overwrite")
    if args.trust_checkpoint:
        convert_argv.append("--trust-checkpoint")
    start = time.perf_counter()
    print(f"exporting {args.checkpoint} -> {args.out}", flush=True)
    out_dir = convert.convert(
        convert.build_parser().parse_args(convert_argv), load_option="--checkpoint", out_option="--out"
    )
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
