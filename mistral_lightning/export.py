"""`mistral-lightning export`: a training checkpoint (DCP folder or single .ckpt file) -> HF folder.

The HF folder (config.json + safetensors) loads unchanged in `transformers.MistralForCausalLM`.
Offline export is `convert --loader lightning --saver hf` with the training-side option names; it
streams one parameter at a time. (`fit --export_hf_dir` writes the live model with `save_hf_checkpoint`.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mistral_lightning.checkpoint.convert import resolve_model_config, save_hf
from mistral_lightning.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES, DTYPES
from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint


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
        "--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the saved weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = LightningCheckpoint(args.checkpoint, model_config=resolve_model_config(args.model_config))
    try:
        out = save_hf(
            source,
            Path(args.out),
            dtype=DTYPES[args.dtype],
            max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
            overwrite=args.overwrite,
        )
    finally:
        source.close()
    print(f"wrote {out}")
    return 0
