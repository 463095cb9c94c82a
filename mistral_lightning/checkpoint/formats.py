"""What `convert` knows and takes: its loader and saver names, and one conversion's settings; torch-free so
that `convert --help` stays light."""

from __future__ import annotations

from dataclasses import dataclass

# --loader and --saver names (ModelLink's included) -> the format each reads or writes.
LOADERS = {"hf": "hf", "llama2_hf": "hf", "megatron": "megatron", "lightning": "lightning"}
SAVERS = {"hf": "hf", "megatron": "megatron"}
MG2HG = "mg2hg"  # ModelLink writes Megatron -> HF results into this subfolder of --save-dir


@dataclass(frozen=True)
class ConversionSettings:
    """One conversion, in the terms of `convert`'s options (None: keep the source's value or the default)."""

    loader: str  # a LOADERS name
    saver: str  # a SAVERS name
    load_dir: str
    save_dir: str
    model_config: str | None = None  # a preset name or an HF config.json / folder
    save_model_type: str = "megatron"  # or "save_huggingface_llama": HF weights into <save_dir>/mg2hg
    target_tensor_parallel_size: int | None = None
    target_pipeline_parallel_size: int | None = None
    make_vocab_size_divisible_by: int | None = None
    params_dtype: str | None = None
    max_shard_size_gb: float = 5.0
    overwrite: bool = False
    trust_checkpoint: bool = False
