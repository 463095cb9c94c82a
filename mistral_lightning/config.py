"""MistralConfig: the one description of the network that flows from YAML / config.json to the model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


# The dtypes weights are saved or loaded in, each under its short and its torch spelling.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class ConfigError(UserError):
    """A configuration a user wrote (or a config.json on disk) is invalid."""


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype a name in DTYPES stands for."""
    if name not in DTYPES:
        spellings = {}
        for alias, dtype in DTYPES.items():
            spellings.setdefault(dtype, []).append(alias)
        accepted = ", ".join("/".join(aliases) for aliases in spellings.values())
        raise ConfigError(f"unknown dtype {name!r}; use one of {accepted}")
    return DTYPES[name]


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
        _refuse_unrepresentable(hf, source)
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


# HF model types whose dense decoder is Mistral's (Llama's differs only in what the checks below refuse).
SUPPORTED_MODEL_TYPES = ("mistral", "llama")


def _refuse_unrepresentable(hf: dict[str, Any], source: str) -> None:
    """An HF config whose model this product would silently change (another activation, rope scaling,
    biases, another architecture) is refused, each in one line naming the key."""
    model_type = hf.get("model_type", "mistral")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported (only the dense {' and '.join(SUPPORTED_MODEL_TYPES)} "
            "architectures are); loading it as Mistral would change the model"
        )
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        raise ConfigError(
            f"{source}: hidden_act {activation!r} is not supported: Mistral's MLP is SwiGLU with silu, so these "
            "weights would compute something else"
        )
    # transformers < 5 writes rope_scaling; 5 writes rope_parameters, with rope_type "default" for plain RoPE.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type != "default":
        raise ConfigError(
            f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE with rope_theta); "
            "the model would see other positions than it was trained with"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(
                f"{source}: {key}=true is not supported: Mistral's linear layers have no biases, so they "
                "would be dropped"
            )


_MISTRAL_7B = MistralConfig()
_MISTRAL_7B_V03 = dataclasses.replace(_MISTRAL_7B, vocab_size=32768, rope_theta=1e6, sliding_window=None)
PRESETS: dict[str, MistralConfig] = {
    "mistral-7b-v0.1": _MISTRAL_7B,
    "mistral-7b-instruct-v0.2": dataclasses.replace(_MISTRAL_7B, rope_theta=1e6, sliding_window=None),
    # v0.3: the vocabulary grows to 32768 with control tokens ([INST], [/INST], tool calls); tokenizer.model.v3.
    "mistral-7b-v0.3": _MISTRAL_7B_V03,
    "mistral-7b-instruct-v0.3": _MISTRAL_7B_V03,
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


def parameter_shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names, in the model's module order, with their shapes."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        layer = f"layers.{i}"
        shapes[f"{layer}.attn_norm.weight"] = (hidden,)
        shapes[f"{layer}.attn.q.weight"] = (q_rows, hidden)
        shapes[f"{layer}.attn.k.weight"] = (kv_rows, hidden)
        shapes[f"{layer}.attn.v.weight"] = (kv_rows, hidden)
        shapes[f"{layer}.attn.o.weight"] = (hidden, q_rows)
        shapes[f"{layer}.mlp_norm.weight"] = (hidden,)
        shapes[f"{layer}.mlp.gate.weight"] = (ffn, hidden)
        shapes[f"{layer}.mlp.up.weight"] = (ffn, hidden)
        shapes[f"{layer}.mlp.down.weight"] = (hidden, ffn)
    shapes["norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def window_choice_note(config: MistralConfig, pretrained: str | Path | None) -> str | None:
    """One line when `config`'s sliding window is not the `pretrained` folder's own (the 32K recipe imposes 4096
    on v0.2 weights, whose config.json has none), so that the choice is visible; None when they agree."""
    if not pretrained or not (Path(pretrained) / "config.json").is_file():
        return None
    own = MistralConfig.from_hf(pretrained).sliding_window
    if own == config.sliding_window:
        return None
    describe = lambda window: "no sliding window" if window is None else f"sliding_window={window}"  # noqa: E731
    return (
        f"note: model.model_config trains with {describe(config.sliding_window)}; model.pretrained={pretrained} "
        f"has {describe(own)} in its config.json; the export's config.json records the trained one"
    )


def resolve_model_config(
    model_config: str | Path | dict | MistralConfig | None, pretrained: str | Path | None = None
) -> MistralConfig:
    """The architecture: `model_config` (a preset name, an HF folder or config.json, a dict of fields or a
    MistralConfig), else the config.json of the `pretrained` HF folder.

    Both may be given (e.g. the 32K recipe's 4096 window over Instruct-v0.2 weights, whose
    config.json has none); then their tensor shapes must agree.
    """
    from_folder = MistralConfig.from_hf(pretrained) if pretrained else None
    if model_config is None:
        if from_folder is None:
            raise ConfigError(
                "no model config: set model.model_config (a preset name or a config) or model.pretrained "
                "(an HF folder)"
            )
        return from_folder
    if isinstance(model_config, MistralConfig):
        config = model_config
    elif isinstance(model_config, dict):
        config = MistralConfig(**model_config)
    elif str(model_config) in PRESETS:
        config = MistralConfig.from_name(str(model_config))
    elif Path(model_config).exists():
        config = MistralConfig.from_hf(model_config)
    else:
        raise ConfigError(
            f"model config {str(model_config)!r}: neither a preset ({', '.join(sorted(PRESETS))}) nor an "
            "existing HF folder or config.json"
        )
    if from_folder is not None:
        mismatched = [f for f in SHAPE_FIELDS if getattr(config, f) != getattr(from_folder, f)]
        if mismatched:
            details = ", ".join(f"{f}: {getattr(config, f)} vs {getattr(from_folder, f)}" for f in mismatched)
            raise ConfigError(
                f"model.model_config and model.pretrained={pretrained} disagree on tensor shapes ({details}); "
                "pick the preset that matches the weights, or drop model.model_config to use config.json"
            )
    return config
