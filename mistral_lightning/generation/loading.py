"""Model and tokenizer for inference from what the user points at: an HF folder or a `fit` checkpoint."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from mistral_lightning.adapters.merge import with_adapters
from mistral_lightning.checkpoint.base import CheckpointError, load_torch_file
from mistral_lightning.checkpoint.hf import HFCheckpoint
from mistral_lightning.checkpoint.integrity import LIGHTNING_METADATA
from mistral_lightning.checkpoint.lightning_ckpt import DCP_METADATA, LightningCheckpoint
from mistral_lightning.config import parse_dtype
from mistral_lightning.devices import check_device_available
from mistral_lightning.generation.settings import InferenceSettings
from mistral_lightning.kernels import pack_linear_weights
from mistral_lightning.kernels.backend import torch_npu
from mistral_lightning.model import Mistral
from mistral_lightning.option_values import AUTO_DEVICE, AUTO_DTYPE
from mistral_lightning.tokenizer import Tokenizer, default_tokenizer_path, has_tokenizer

__all__ = [
    "load_for_inference",
    "load_model",
    "load_tokenizer",
    "open_weights",
    "recorded_pretrained",
    "resolve_device",
    "tokenizer_source",
]


def load_model(
    checkpoint: str | Path,
    *,
    adapter: str | Path | None = None,
    device: str = "cpu",
    dtype: str = AUTO_DTYPE,
    trust_checkpoint: bool = False,
) -> Mistral:
    """An eval-mode Mistral for inference; dtype is a name in config.DTYPES, or "auto" for the checkpoint's own.
    A `fit` checkpoint holding pickled objects that could run code loads only with `trust_checkpoint`.

    LoRA adapters (a PEFT `adapter` folder over the checkpoint, or those of a LoRA `fit` checkpoint over the
    base it records) are merged into the weights as they load, so the model runs at the base model's speed.

    On the CPU its linear weights are packed for oneDNN (kernels/packed_linear.py): several times faster
    decoding, but the model can then no longer be trained or saved.
    """
    device = resolve_device(device)
    check_device_available(device, "--device")  # one line for cuda on a CPU-only torch, before any reading
    torch_dtype = None if dtype == AUTO_DTYPE else parse_dtype(dtype)
    weights = with_adapters(open_weights(Path(checkpoint), trust_checkpoint), adapter)
    model = Mistral.from_pretrained(weights, torch_dtype, device).eval()
    pack_linear_weights(model)
    return model


def resolve_device(device: str) -> str:
    """`device`, or for "auto" the machine's accelerator: cuda if available, else npu if torch_npu sees one,
    else cpu."""
    if device != AUTO_DEVICE:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if importlib.util.find_spec("torch_npu") is not None:
        torch_npu()  # registers torch.npu
        if torch.npu.is_available():
            return "npu"
    return "cpu"


def open_weights(path: Path, trust_checkpoint: bool = False) -> HFCheckpoint | LightningCheckpoint:
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
    return LightningCheckpoint(path, trust_pickle=trust_checkpoint)


def load_tokenizer(
    tokenizer_model: str | Path | None,
    checkpoint: str | Path | None,
    *,
    vocab_size: int | None = None,
    trust_checkpoint: bool = False,
) -> Tokenizer:
    """The tokenizer of the model at `checkpoint`, unless `tokenizer_model` overrides it.

    An HF folder brings its own tokenizer files; a `fit` checkpoint brings those of the HF folder it was
    trained from (its `model.pretrained`). Only when neither is known is the Mistral v1 tokenizer used,
    with a note. `vocab_size`: the model's, which the tokenizer's ids must fit. `trust_checkpoint`: as for
    `load_model`, to read the hyper-parameters of a checkpoint that holds other pickled objects.
    """
    if tokenizer_model is not None:
        tokenizer = Tokenizer(tokenizer_model)
    else:
        source = tokenizer_source(Path(checkpoint), trust_checkpoint) if checkpoint else None
        if source is None:
            source = default_tokenizer_path()
            print(
                f"note: {checkpoint or 'the model'} names no tokenizer (no tokenizer files, no model.pretrained); "
                f"using the Mistral v1 tokenizer {source}; pass --tokenizer for another",
                file=sys.stderr,
            )
        tokenizer = Tokenizer(source)
    if vocab_size is not None:
        tokenizer.check_fits(vocab_size, checkpoint or "in use")
    return tokenizer


def tokenizer_source(checkpoint: Path, trust_checkpoint: bool = False) -> Path | None:
    """Where the checkpoint's own tokenizer lives: its HF folder, or the folder its training started from."""
    if checkpoint.is_dir() and not (checkpoint / DCP_METADATA).is_file():
        return checkpoint if has_tokenizer(checkpoint) else None
    pretrained = recorded_pretrained(checkpoint, trust_checkpoint)
    if pretrained is None:
        return None
    if not pretrained.is_dir():
        raise CheckpointError(
            f"{checkpoint} was trained from model.pretrained={pretrained}, which no longer exists, so its "
            "tokenizer is unknown; pass --tokenizer with that model's tokenizer file or folder"
        )
    return pretrained if has_tokenizer(pretrained) else None


def recorded_pretrained(checkpoint: Path, trust_checkpoint: bool = False) -> Path | None:
    """The `model.pretrained` folder a `fit` checkpoint (DCP folder or .ckpt file) records, if any."""
    metadata = checkpoint / LIGHTNING_METADATA if checkpoint.is_dir() else checkpoint
    if not metadata.is_file():
        return None
    saved = load_torch_file(metadata, trust_pickle=trust_checkpoint)
    hyper_parameters = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    pretrained = (hyper_parameters or {}).get("pretrained")
    return Path(pretrained) if pretrained else None


def load_for_inference(settings: InferenceSettings) -> tuple[Mistral, Tokenizer]:
    """The model (with its adapter merged in) and its tokenizer, as every inference command loads them."""
    model = load_model(
        settings.checkpoint,
        adapter=settings.adapter,
        device=settings.device,
        dtype=settings.dtype,
        trust_checkpoint=settings.trust_checkpoint,
    )
    tokenizer = load_tokenizer(
        settings.tokenizer,
        settings.checkpoint,
        vocab_size=model.config.vocab_size,
        trust_checkpoint=settings.trust_checkpoint,
    )
    return model, tokenizer
