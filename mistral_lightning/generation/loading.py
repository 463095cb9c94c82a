"""Model and tokenizer for inference from what the user points at: an HF folder or a `fit` checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mistral_lightning.checkpoint.base import CheckpointError
from mistral_lightning.checkpoint.hf import HFCheckpoint
from mistral_lightning.checkpoint.lightning_ckpt import DCP_METADATA, LightningCheckpoint
from mistral_lightning.config import DTYPES, parse_dtype
from mistral_lightning.kernels import pack_linear_weights
from mistral_lightning.model import Mistral
from mistral_lightning.tokenizer import HF_TOKENIZER_FILE, Tokenizer, default_tokenizer_path

AUTO_DTYPE = "auto"  # keep the checkpoint's own dtype


def load_model(checkpoint: str | Path, *, device: str = "cpu", dtype: str = AUTO_DTYPE) -> Mistral:
    """An eval-mode Mistral for inference; dtype is a name in config.DTYPES, or "auto" for the checkpoint's own.

    On the CPU its linear weights are packed for oneDNN (kernels/packed_linear.py): several times faster
    decoding, but the model can then no longer be trained or saved.
    """
    torch_dtype = None if dtype == AUTO_DTYPE else parse_dtype(dtype)
    model = Mistral.from_pretrained(_open(Path(checkpoint)), torch_dtype, device).eval()
    pack_linear_weights(model)
    return model


def _open(path: Path) -> HFCheckpoint | LightningCheckpoint:
    """The weights at `path`: an HF folder, or a `fit` checkpoint (DCP folder or single file)."""
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
        return HFCheckpoint(path)
    return LightningCheckpoint(path)


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
        "--dtype",
        choices=[AUTO_DTYPE, *DTYPES],
        default=AUTO_DTYPE,
        help="dtype of the loaded weights; auto: the checkpoint's own",
    )
