"""Model and tokenizer for inference from what the user points at: an HF folder or a `fit` checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mistral_lightning.checkpoint.hf import DTYPES as CHECKPOINT_DTYPES
from mistral_lightning.checkpoint.hf import CheckpointError
from mistral_lightning.checkpoint.lightning_ckpt import DCP_METADATA, LightningCheckpoint
from mistral_lightning.kernels import pack_linear_weights
from mistral_lightning.model import Mistral
from mistral_lightning.tokenizer import HF_TOKENIZER_FILE, Tokenizer, default_tokenizer_path

DTYPES = {"auto": None, **CHECKPOINT_DTYPES}


def load_model(checkpoint: str | Path, *, device: str = "cpu", dtype: str = "auto") -> Mistral:
    """An eval-mode Mistral for inference; dtype "auto" keeps the checkpoint's own dtype.

    On the CPU its linear weights are packed for oneDNN (kernels/packed_linear.py): several times faster
    decoding, but the model can then no longer be trained or saved.
    """
    model = _load(Path(checkpoint), device, dtype)
    pack_linear_weights(model)
    return model


def _load(path: Path, device: str, dtype: str) -> Mistral:
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or folder; pass an HF model folder (config.json + *.safetensors) "
            "or a checkpoint written by `fit` (a DCP folder or a .ckpt file)"
        )
    if path.is_dir() and not (path / DCP_METADATA).is_file():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path}: holds neither config.json + *.safetensors (an HF model) nor {DCP_METADATA} (a `fit` "
                "checkpoint), so there are no weights to load; point --checkpoint at the folder that has them"
            )
        return Mistral.from_pretrained(path, DTYPES[dtype], device).eval()
    return _from_training_checkpoint(LightningCheckpoint(path), device, DTYPES[dtype]).eval()


@torch.no_grad()
def _from_training_checkpoint(source: LightningCheckpoint, device: str, dtype: torch.dtype | None) -> Mistral:
    try:
        with torch.device("meta"):
            model = Mistral(source.config)
        model.to_empty(device=device)
        for name, param in model.named_parameters():
            tensor = source.read(name)
            param.data = tensor.to(device=device, dtype=dtype or tensor.dtype)
    finally:
        source.close()
    return model


def load_tokenizer(tokenizer_model: str | Path | None, checkpoint: str | Path) -> Tokenizer:
    """--tokenizer-model, else the checkpoint folder's tokenizer.model, else mistral-common's v1 model."""
    if tokenizer_model is not None:
        return Tokenizer(tokenizer_model)
    beside = Path(checkpoint) / HF_TOKENIZER_FILE
    if beside.is_file():
        return Tokenizer(beside)
    fallback = default_tokenizer_path()
    if fallback is None:
        raise CheckpointError(
            f"{checkpoint}: no {HF_TOKENIZER_FILE} in the checkpoint folder; pass --tokenizer-model"
        )
    print(
        f"note: {checkpoint} has no {HF_TOKENIZER_FILE}; using the Mistral v1 tokenizer {fallback}",
        file=sys.stderr,
    )
    return Tokenizer(fallback)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every inference command shares."""
    parser.add_argument(
        "--checkpoint", required=True, help="HF model folder, or a `fit` checkpoint (DCP folder or .ckpt)"
    )
    parser.add_argument(
        "--tokenizer-model",
        help="sentencepiece .model file or HF folder (default: the checkpoint's tokenizer.model, else Mistral v1)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="auto", help="auto: the checkpoint's dtype"
    )
