"""`mistral-lightning convert`: HF safetensors <-> Megatron/ModelLink at any TP/PP, and `fit` checkpoints -> both.

Every loader hands out our parameters by name (slices of them, read lazily); every saver pulls
what it needs. The HF saver goes tensor by tensor, the Megatron saver rank by rank, so peak memory
stays near one HF shard or one rank's share of the model. The recipe's ModelLink spellings are
accepted too (`--loader llama2_hf`, `--model-type GPT`, `--tokenizer-model`,
`--save-model-type save_huggingface_llama`, which writes `<save-dir>/mg2hg/` as ModelLink does).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from mistral_lightning.checkpoint.base import CheckpointError, WeightSource, check_shapes
from mistral_lightning.checkpoint.hf import HFCheckpoint, save_hf
from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint
from mistral_lightning.checkpoint.megatron import MegatronCheckpoint, save_megatron
from mistral_lightning.checkpoint.megatron_layout import MegatronLayout
from mistral_lightning.config import (
    DTYPES,
    MistralConfig,
    parameter_shapes,
    parse_dtype,
    resolve_model_config,
)

LOADERS = {"hf": "hf", "llama2_hf": "hf", "megatron": "megatron", "lightning": "lightning"}
SAVERS = {"hf": "hf", "megatron": "megatron"}
MG2HG = "mg2hg"  # ModelLink writes Megatron -> HF results into this subfolder of --save-dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning convert",
        description="Convert Mistral checkpoints between HF safetensors, the Megatron/ModelLink layout "
        "(any TP/PP) and this product's training checkpoints.",
    )
    parser.add_argument(
        "--loader", required=True, choices=list(LOADERS), help="source format (llama2_hf is the recipe's hf)"
    )
    parser.add_argument("--saver", required=True, choices=list(SAVERS), help="target format")
    parser.add_argument(
        "--load-dir",
        required=True,
        metavar="DIR",
        help="source folder (a .ckpt file or DCP folder for --loader lightning)",
    )
    parser.add_argument(
        "--save-dir", required=True, metavar="DIR", help="target folder; written under a temporary name first"
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
        "--params-dtype", choices=list(DTYPES), help="saved dtype (default: the source's dtype)"
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        metavar="N",
        help="Megatron pads the vocabulary to a multiple of this x TP (default: the source's, or 1 as in ModelLink)",
    )
    parser.add_argument(
        "--model-config",
        metavar="PRESET_OR_HF_DIR",
        help="preset name or HF folder/config.json describing the model; needed by --loader lightning when no "
        "config.json sits next to the checkpoint, and overrides a Megatron checkpoint's args",
    )
    parser.add_argument(
        "--max-shard-size-gb",
        type=float,
        metavar="GB",
        default=5.0,
        help="HF saver: largest safetensors file (up to one is held in memory while writing)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle arbitrary Python objects in .pt/.ckpt files (only for checkpoints you trust)",
    )
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
        default="megatron",
        help=f"save_huggingface_llama: write HF weights into <save-dir>/{MG2HG}, config from <save-dir>",
    )
    return parser


def open_source(loader: str, path: str, model_config: MistralConfig | None, trust: bool) -> WeightSource:
    if loader == "hf":
        return HFCheckpoint(path)
    if loader == "megatron":
        return MegatronCheckpoint(path, model_config=model_config, trust_pickle=trust)
    return LightningCheckpoint(path, model_config=model_config, trust_pickle=trust)


def convert(args: argparse.Namespace) -> Path:
    loader, saver = LOADERS[args.loader], SAVERS[args.saver]
    save_dir = Path(args.save_dir)
    model_config = None if args.model_config is None else resolve_model_config(args.model_config)
    if args.save_model_type == "save_huggingface_llama":
        # The recipe passes the original HF folder: ModelLink takes its config and writes into mg2hg/.
        saver = "hf"
        if model_config is None and (save_dir / "config.json").is_file():
            model_config = MistralConfig.from_hf(save_dir)
        save_dir = save_dir / MG2HG
    if saver == "hf":
        for option in ("target_tensor_parallel_size", "target_pipeline_parallel_size"):
            if getattr(args, option) not in (None, 1):
                raise CheckpointError(
                    f"--{option.replace('_', '-')} applies to --saver megatron only: HF checkpoints are not "
                    "split; drop the option (or pass 1)"
                )
    if args.max_shard_size_gb <= 0:
        raise CheckpointError(f"--max-shard-size-gb must be positive, got {args.max_shard_size_gb}")

    source = open_source(loader, args.load_dir, model_config, args.trust_checkpoint)
    try:
        check_shapes(source, parameter_shapes(source.config))
        # Without --params-dtype keep the source's dtype (ModelLink's fp16 default would silently round bf16).
        dtype = parse_dtype(args.params_dtype) if args.params_dtype else source.dtype
        if saver == "hf":
            return save_hf(
                source,
                save_dir,
                dtype=dtype,
                max_shard_bytes=int(args.max_shard_size_gb * 1024**3),
                overwrite=args.overwrite,
                progress=functools.partial(print, flush=True),
            )
        # Unset Megatron options keep the source checkpoint's values (or the ModelLink defaults).
        inherited = source.layout if isinstance(source, MegatronCheckpoint) else MegatronLayout(source.config)

        def option(value: int | None, default: int) -> int:
            return default if value is None else value

        layout = MegatronLayout(
            source.config,
            tp=option(args.target_tensor_parallel_size, inherited.tp),
            pp=option(args.target_pipeline_parallel_size, inherited.pp),
            vocab_divisible_by=option(args.make_vocab_size_divisible_by, inherited.vocab_divisible_by),
        )
        iteration = source.iteration if isinstance(source, MegatronCheckpoint) else 1
        return save_megatron(
            source, save_dir, layout, dtype=dtype, iteration=iteration, overwrite=args.overwrite
        )
    finally:
        source.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    print(f"converting {args.loader} {args.load_dir} -> {args.saver} {args.save_dir}", flush=True)
    out_dir = convert(args)
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
