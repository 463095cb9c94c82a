"""`mistral-lightning export`: a training checkpoint (DCP folder or single .ckpt file) -> an HF folder a
server can use as it is.

This is `convert --loader lightning --saver hf` under the training side's option names: the weights in
`--dtype` (bfloat16 unless told otherwise, whatever the training precision), config.json naming it, and
the tokenizer, chat-template and generation files of the `model.pretrained` folder the checkpoint
records, copied unchanged. It streams one parameter at a time; `fit --export_hf_dir` writes through
the same `checkpoint.hf.save_hf`.

A LoRA checkpoint (adapters only, over its `model.pretrained` base) is merged into that base by default
(`W + scaling * B @ A` in fp32, then `--dtype`); `--lora-format peft` writes the adapters alone as a folder
Hugging Face PEFT loads (`adapter_model.safetensors` + `adapter_config.json`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# Only torch-free modules here, so `--help` is quick; the checkpoint stack is imported after parsing.
from mistral_lightning.checkpoint.formats import ConversionSettings
from mistral_lightning.cli.options import DefaultsHelpFormatter, add_trust_checkpoint
from mistral_lightning.option_values import DTYPE_NAMES
from mistral_lightning.outputs import OutputTarget, user_path

LORA_FORMATS = ("merged", "peft")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning export",
        description=__doc__,
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=user_path,
        required=True,
        default=argparse.SUPPRESS,
        help="Lightning checkpoint: DCP folder or .ckpt file",
    )
    parser.add_argument(
        "--out",
        type=user_path,
        required=True,
        default=argparse.SUPPRESS,
        help="HF folder to write (config.json + safetensors)",
    )
    parser.add_argument(
        "--model-config",
        type=user_path,
        help="preset name or HF folder/config.json; default: the architecture stored in the checkpoint",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPE_NAMES),
        help="dtype of the saved weights; default: bfloat16, or for --lora-format peft the adapters' own",
    )
    parser.add_argument(
        "--lora-format",
        choices=list(LORA_FORMATS),
        default="merged",
        help="a LoRA checkpoint: merged into its base as a full HF folder, or peft: the adapter folder alone",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out folder that holds a previous HF export (and nothing else)",
    )
    add_trust_checkpoint(parser, "--checkpoint")
    return parser


def export_peft(args: argparse.Namespace) -> Path:
    """The adapters of a LoRA `fit` checkpoint as a PEFT folder; the base is not needed."""
    from mistral_lightning.adapters.merge import checkpoint_adapters
    from mistral_lightning.adapters.peft_format import AdapterError, write_peft_folder
    from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint
    from mistral_lightning.config import parse_dtype, resolve_model_config

    model_config = None if args.model_config is None else resolve_model_config(args.model_config)
    checkpoint = LightningCheckpoint(
        args.checkpoint, model_config=model_config, trust_pickle=args.trust_checkpoint
    )
    if not checkpoint.lora:
        raise AdapterError(
            f"--checkpoint {args.checkpoint}: records no model.lora, so it holds no LoRA adapters; drop "
            "--lora-format peft to export the full model"
        )
    adapters = checkpoint_adapters(checkpoint)
    base = checkpoint.pretrained
    target = OutputTarget(
        Path(args.out),
        option="--out",
        overwrite=args.overwrite,
        protected={
            "the --checkpoint source": args.checkpoint,
            "the model.pretrained folder it records": base,
        },
    )
    try:
        return write_peft_folder(
            ((name, adapters.read(name)) for name in adapters.adapter_names),
            adapters.lora,
            target,
            base_model_name_or_path=str(Path(base).resolve()) if base and Path(base).is_dir() else base,
            dtype=None if args.dtype is None else parse_dtype(args.dtype),
        )
    finally:
        checkpoint.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    print(f"exporting {args.checkpoint} -> {args.out}", flush=True)
    if args.lora_format == "peft":
        out_dir = export_peft(args)
        print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s", flush=True)
        return 0
    from mistral_lightning.adapters.merge import with_adapters
    from mistral_lightning.checkpoint.conversion import convert

    settings = ConversionSettings(
        "lightning",
        "hf",
        args.checkpoint,
        args.out,
        model_config=args.model_config,
        params_dtype=args.dtype or "bfloat16",
        overwrite=args.overwrite,
        trust_checkpoint=args.trust_checkpoint,
    )
    out_dir = convert(
        settings,
        load_option="--checkpoint",
        out_option="--out",
        weights_of=with_adapters,
    )
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
