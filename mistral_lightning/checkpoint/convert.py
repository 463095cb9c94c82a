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
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

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
from mistral_lightning.outputs import OutputTarget

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
        "--params-dtype",
        "--dtype",
        dest="params_dtype",
        choices=list(DTYPES),
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a --save-dir that holds a previous output of the same format (and nothing else)",
    )
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


def _hf_folder(path: str | Path | None) -> Path | None:
    """The HF folder a path names: itself, or the folder of its config.json; None for a preset name."""
    if path is None:
        return None
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name == "config.json" else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def companion_source(source: WeightSource, config_folder: Path | None, out_option: str) -> Path | None:
    """The HF folder whose tokenizer and generation files belong with these weights: the folder being
    converted, the `model.pretrained` folder a training checkpoint records, else the config's folder."""
    if isinstance(source, HFCheckpoint):
        return source.path
    if isinstance(source, LightningCheckpoint) and source.pretrained:
        if Path(source.pretrained).is_dir():
            return Path(source.pretrained)
        print(
            f"note: {source.path} records model.pretrained={source.pretrained}, which is not a folder from "
            f"here; {out_option} gets no tokenizer files (copy them from that folder, or run from where fit ran)",
            file=sys.stderr,
        )
    return config_folder


def convert(
    args: argparse.Namespace,
    *,
    load_option: str = "--load-dir",
    out_option: str = "--save-dir",
    weights_of: Callable[[WeightSource], WeightSource] | None = None,
) -> Path:
    """Run one conversion; the option names are the ones the user typed, for messages (`export` has its own).
    `weights_of` turns the opened source into the weights to save (`export` merges LoRA adapters with it)."""
    loader, saver = LOADERS[args.loader], SAVERS[args.saver]
    save_dir = Path(args.save_dir)
    model_config = None if args.model_config is None else resolve_model_config(args.model_config)
    config_folder = _hf_folder(args.model_config)
    if args.save_model_type == "save_huggingface_llama":
        # The recipe passes the original HF folder: ModelLink takes its config and writes into mg2hg/.
        saver = "hf"
        if model_config is None and (save_dir / "config.json").is_file():
            model_config = MistralConfig.from_hf(save_dir)
            config_folder = save_dir
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

    source = weights = open_source(loader, args.load_dir, model_config, args.trust_checkpoint)
    try:
        if weights_of is not None:
            weights = weights_of(source)
        check_shapes(weights, parameter_shapes(weights.config))
        files_from = companion_source(source, config_folder, out_option) if saver == "hf" else None
        target = OutputTarget(
            save_dir,
            option=out_option,
            overwrite=args.overwrite,
            protected={
                f"the {load_option} source": args.load_dir,
                "the folder the tokenizer files come from": files_from,
                "the folder the model config comes from": config_folder,
                **_recorded_pretrained(source),
            },
        )
        if args.params_dtype:
            dtype = parse_dtype(args.params_dtype)
        elif loader == "lightning":
            dtype = torch.bfloat16  # fp32 master weights are a training artefact; Mistral releases bf16
        else:
            dtype = source.dtype  # ModelLink's fp16 default would silently round bf16
        if saver == "hf":
            return save_hf(
                weights,
                target,
                dtype=dtype,
                max_shard_bytes=int(args.max_shard_size_gb * 1024**3),
                progress=functools.partial(print, flush=True),
                files_from=files_from,
            )
        # Unset Megatron options keep the source checkpoint's values (or the ModelLink defaults).
        inherited = (
            source.layout if isinstance(source, MegatronCheckpoint) else MegatronLayout(weights.config)
        )

        def option(value: int | None, default: int) -> int:
            return default if value is None else value

        layout = MegatronLayout(
            weights.config,
            tp=option(args.target_tensor_parallel_size, inherited.tp),
            pp=option(args.target_pipeline_parallel_size, inherited.pp),
            vocab_divisible_by=option(args.make_vocab_size_divisible_by, inherited.vocab_divisible_by),
        )
        iteration = source.iteration if isinstance(source, MegatronCheckpoint) else 1
        return save_megatron(weights, target, layout, dtype=dtype, iteration=iteration)
    finally:
        weights.close()
        source.close()


def _recorded_pretrained(source: WeightSource) -> dict[str, str]:
    """A training checkpoint's model.pretrained folder is never an output, found here or not."""
    if isinstance(source, LightningCheckpoint) and source.pretrained:
        return {"the model.pretrained folder the checkpoint records": source.pretrained}
    return {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    print(f"converting {args.loader} {args.load_dir} -> {args.saver} {args.save_dir}", flush=True)
    out_dir = convert(args)
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
