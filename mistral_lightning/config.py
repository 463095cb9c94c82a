"""MistralConfig: the one description of the network that flows from YAML / config.json to the model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_lightning.errors import UserError

# The fields that fix tensor shapes: weights fit a config exactly when these agree.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)


class ConfigError(UserError):
    """A configuration a user wrote (or a config.json on disk) is invalid."""


@dataclass
class MistralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Query i sees key j iff i - sliding_window < j <= i; None means full causal attention.
    sliding_window: int | None = 4096
    max_seq_length: int = 32768
    bos_token_id: int = 1
    eos_token_id: int = 2
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in (*SHAPE_FIELDS, "max_seq_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"MistralConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"MistralConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"MistralConfig.head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(
                f"MistralConfig.sliding_window must be a positive integer or null, got {self.sliding_window!r}"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("MistralConfig.rms_norm_eps and rope_theta must be positive")

    @property
    def num_params(self) -> int:
        """Parameter count, embedding and LM head included."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size

    def replace(self, **changes: Any) -> MistralConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> MistralConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, path: str | Path) -> MistralConfig:
        """Read an HF folder or its config.json."""
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ConfigError(
                f"{config_file}: no config.json found; pass an HF model folder or its config.json"
            )
        try:
            hf = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config_file}: not valid JSON ({err})") from err
        return cls.from_hf_dict(hf, source=str(config_file))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> MistralConfig:
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [key for key in required if key not in hf]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing}; is this a Mistral/Llama config.json?")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError(
                f"{source}: tie_word_embeddings=true is not a Mistral layout (its embeddings are untied)"
            )
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            sliding_window=hf.get("sliding_window"),
            max_seq_length=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=hf.get("eos_token_id", 2),
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_seq_length,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "torch_dtype": torch_dtype,
        }


_MISTRAL_7B = MistralConfig()
PRESETS: dict[str, MistralConfig] = {
    "mistral-7b-v0.1": _MISTRAL_7B,
    "mistral-7b-instruct-v0.2": dataclasses.replace(_MISTRAL_7B, rope_theta=1e6, sliding_window=None),
    # The seed recipe: v0.2 weights trained with a 4096 window at sequence length 32768.
    "mistral-7b-32k": dataclasses.replace(
        _MISTRAL_7B, rope_theta=1e6, sliding_window=4096, max_seq_length=32768
    ),
    # CPU tests and the demo: the real 32000-token vocabulary so the real tokenizer works.
    "tiny": MistralConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        sliding_window=64,
        max_seq_length=512,
    ),
}
