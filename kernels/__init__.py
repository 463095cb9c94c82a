"""Device-dispatched kernels: each function picks an implementation by the tensor's device.

This folder sits at the top of the repository but installs as `mistral_lightning.kernels` (the
`package-dir` mapping in pyproject.toml), so code imports it under that name.
"""

from mistral_lightning.kernels.attention import masked_attention, sliding_window_attention
from mistral_lightning.kernels.attention_dispatch import attention_path
from mistral_lightning.kernels.backend import BACKEND_ENV, resolve_backend
from mistral_lightning.kernels.cross_entropy import chunked_cross_entropy, chunked_token_log_probs
from mistral_lightning.kernels.packed_linear import pack_linear_weights
from mistral_lightning.kernels.rms_norm import rms_norm
from mistral_lightning.kernels.rotary import apply_rotary, rope_cos_sin
from mistral_lightning.kernels.swiglu import swiglu

__all__ = [
    "BACKEND_ENV",
    "apply_rotary",
    "attention_path",
    "chunked_cross_entropy",
    "chunked_token_log_probs",
    "masked_attention",
    "pack_linear_weights",
    "resolve_backend",
    "rms_norm",
    "rope_cos_sin",
    "sliding_window_attention",
    "swiglu",
]
