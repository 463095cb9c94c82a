"""What loading a model for inference takes, as one typed value: the inference commands' shared options
(`cli.options.add_model_arguments`), lm-eval's model_args and the server's worker all build it. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from mistral_lightning.option_values import AUTO_DEVICE, AUTO_DTYPE


@dataclass(frozen=True)
class InferenceSettings:
    checkpoint: str  # an HF model folder, or a `fit` checkpoint (DCP folder or .ckpt)
    adapter: str | None = None  # a PEFT LoRA adapter folder, merged into the weights as they load
    tokenizer: str | None = None  # a tokenizer file or folder; default: the checkpoint's own
    device: str = AUTO_DEVICE
    dtype: str = AUTO_DTYPE
    trust_checkpoint: bool = (
        False  # unpickle a checkpoint's objects in full (only for checkpoints one trusts)
    )
