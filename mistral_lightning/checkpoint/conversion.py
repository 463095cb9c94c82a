"""Running one `convert`: open the source, check it, and stream it into the target format.

Every loader hands out our parameters by name (slices of them, read lazily); every saver pulls what it
needs. The HF saver goes tensor by tensor, the Megatron saver rank by rank, so peak memory stays near one
HF shard or one rank's share of the model. `cli/convert.py` holds the command's options.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mistral_lightning.checkpoint.base import CheckpointError, WeightSource, check_shapes
from mistral_lightning.checkpoint.formats import LOADERS, MG2HG, SAVERS, ConversionSettings
from mistral_lightning.checkpoint.hf import HFCheckpoint, save_hf
from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint
from mistral_lightning.checkpoint.megatron import MegatronCheckpoint, save_megatron
from mistral_lightning.checkpoint.megatron_layout import MegatronLayout
from mistral_lightning.checkpoint.tokenizer_files import scratch_tokenizer
from mistral_lightning.config import MistralConfig, parameter_shapes, parse_dtype, resolve_model_config
from mistral_lightning.outputs import OutputTarget


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
    converted, the `model.pretrained` folder a training checkpoint records, else the config's folder; for
    a training checkpoint trained from scratch, the tokenizer file every command assumes for it."""
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
    elif isinstance(source, LightningCheckpoint) and config_folder is None:
        return scratch_tokenizer(source.config)
    return config_folder


def convert(
    settings: ConversionSettings,
    *,
    load_option: str = "--load-dir",
    out_option: str = "--save-dir",
    weights_of: Callable[[WeightSource], WeightSource] | None = None,
) -> Path:
    """Run one conversion; the option names are the ones the user typed, for messages (`export` has its own).
    `weights_of` turns the opened source into the weights to save (`export` merges LoRA adapters with it)."""
    loader, saver = LOADERS[settings.loader], SAVERS[settings.saver]
    save_dir = Path(settings.save_dir)
    model_config = None if settings.model_config is None else resolve_model_config(settings.model_config)
    config_folder = _hf_folder(settings.model_config)
    if settings.save_model_type == "save_huggingface_llama":
        # The recipe passes the original HF folder: ModelLink takes its config and writes into mg2hg/.
        saver = "hf"
        if model_config is None and (save_dir / "config.json").is_file():
            model_config = MistralConfig.from_hf(save_dir)
            config_folder = save_dir
        save_dir = save_dir / MG2HG
    if saver == "hf":
        for option in ("target_tensor_parallel_size", "target_pipeline_parallel_size"):
            if getattr(settings, option) not in (None, 1):
                raise CheckpointError(
                    f"--{option.replace('_', '-')} applies to --saver megatron only: HF checkpoints are not "
                    "split; drop the option (or pass 1)"
                )
    if settings.max_shard_size_gb <= 0:
        raise CheckpointError(f"--max-shard-size-gb must be positive, got {settings.max_shard_size_gb}")

    source = weights = open_source(loader, settings.load_dir, model_config, settings.trust_checkpoint)
    try:
        if weights_of is not None:
            weights = weights_of(source)
        check_shapes(weights, parameter_shapes(weights.config))
        files_from = companion_source(source, config_folder, out_option) if saver == "hf" else None
        target = OutputTarget(
            save_dir,
            option=out_option,
            overwrite=settings.overwrite,
            protected={
                f"the {load_option} source": settings.load_dir,
                "the folder the tokenizer files come from": files_from,
                "the folder the model config comes from": config_folder,
                **_recorded_pretrained(source),
            },
        )
        if settings.params_dtype:
            dtype = parse_dtype(settings.params_dtype)
        elif loader == "lightning":
            dtype = torch.bfloat16  # fp32 master weights are a training artefact; Mistral releases bf16
        else:
            dtype = source.dtype  # ModelLink's fp16 default would silently round bf16
        if saver == "hf":
            return save_hf(
                weights,
                target,
                dtype=dtype,
                max_shard_bytes=int(settings.max_shard_size_gb * 1024**3),
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
            tp=option(settings.target_tensor_parallel_size, inherited.tp),
            pp=option(settings.target_pipeline_parallel_size, inherited.pp),
            vocab_divisible_by=option(settings.make_vocab_size_divisible_by, inherited.vocab_divisible_by),
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
