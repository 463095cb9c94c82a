"""The Mistral network as a plain nn.Module.

No process groups and no device checks live here: tensor/sequence/data parallelism is applied
from outside (mistral_lightning/training/parallel.py) and device-specific operators sit behind kernels/.
Shapes are read from the tensors, not the config, so the same code runs on TP-sharded modules
whose local head counts are a fraction of the config's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from mistral_lightning.config import MistralConfig
from mistral_lightning.kernels import (
    apply_rotary,
    chunked_cross_entropy,
    chunked_token_log_probs,
    masked_attention,
    rms_norm,
    rope_cos_sin,
    sliding_window_attention,
    swiglu,
)
from mistral_lightning.kernels.documents import AttentionMetadata

if TYPE_CHECKING:
    from mistral_lightning.checkpoint.base import WeightSource
    from mistral_lightning.kernels.cross_entropy import Reduction


class KVCache(Protocol):
    """What decoding passes to the model: it stores new keys/values and says what each query may see."""

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append k/v [B, T, Hkv, D]; return all cached k, v and a bool mask [B, 1, T, Tk]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.window = config.sliding_window
        # Context parallelism replaces it from outside with attention over a halo (training/context_parallel.py).
        self.attention_fn = sliding_window_attention
        self.q = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionMetadata | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = apply_rotary(self.q(x).view(batch, seq_len, -1, self.head_dim), cos, sin)
        k = apply_rotary(self.k(x).view(batch, seq_len, -1, self.head_dim), cos, sin)
        v = self.v(x).view(batch, seq_len, -1, self.head_dim)
        if kv_cache is not None:
            k, v, mask = kv_cache.update(self.layer_idx, k, v)
            out = masked_attention(q, k, v, mask)
        else:
            out = self.attention_fn(q, k, v, self.window, metadata=attention)
        return self.o(out.reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate(x), self.up(x)))


class Block(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, cos, sin, attention=None, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, attention, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class Mistral(nn.Module):
    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise parameters in place (after building on the meta device and `to_empty`)."""
        for name, param in self.named_parameters():
            self.init_parameter_(name, param, generator)

    @torch.no_grad()
    def init_parameter_(
        self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Write parameter `name`'s initial value into `tensor` (the parameter, or a full-size copy of a shard)."""
        if isinstance(self.get_submodule(name.rpartition(".")[0]), RMSNorm):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, self.config.initializer_range, generator=generator)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final-norm output [B, T, hidden], i.e. everything but the LM head."""
        h = self.embed(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(
                input_ids.shape[0], -1
            )
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        # One per batch, shared by every layer: what the device kernels derive from the documents (lengths
        # read to the host, Ascend's mask) is then built once per batch, not once per layer.
        attention = AttentionMetadata(document_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, attention, kv_cache)
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab], or of the last `logits_to_keep` positions only (a prefill needs one)."""
        hidden = self.hidden_states(input_ids, position_ids, document_ids=document_ids, kv_cache=kv_cache)
        if logits_to_keep is not None:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        document_ids: torch.Tensor | None = None,
        chunk_size: int = 1024,
        compiled: bool = False,
        reduction: Reduction = "mean",
    ) -> torch.Tensor:
        """Cross-entropy against already-shifted labels (-100 ignored), without whole-sequence fp32 logits:
        the mean over the labelled tokens, or with reduction="sum" their sum.

        compiled: fuse the loss's elementwise work with torch.compile (set with the blocks' compile).
        """
        hidden = self.hidden_states(input_ids, position_ids, document_ids=document_ids)
        return chunked_cross_entropy(hidden, self.lm_head, labels, chunk_size, compiled, reduction)

    def token_log_probs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        document_ids: torch.Tensor | None = None,
        chunk_size: int = 1024,
    ) -> torch.Tensor:
        """log p(label) at each position with an already-shifted label, 0 where it is -100: [B, T] in fp32,
        without whole-sequence logits (what a preference loss sums per answer)."""
        hidden = self.hidden_states(input_ids, position_ids, document_ids=document_ids)
        return chunked_token_log_probs(hidden, self.lm_head, labels, chunk_size)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | WeightSource,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Mistral:
        """Build from an HF folder (config.json + safetensors) or any checkpoint WeightSource, which is
        closed afterwards; dtype defaults to the checkpoint's own."""
        from mistral_lightning.checkpoint.base import fill_model
        from mistral_lightning.checkpoint.hf import HFCheckpoint

        checkpoint = HFCheckpoint(source) if isinstance(source, (str, Path)) else source
        try:
            with torch.device("meta"):
                model = cls(checkpoint.config).to(dtype or checkpoint.dtype)
            model.to_empty(device=device or "cpu")
            fill_model(model, checkpoint)
        finally:
            checkpoint.close()
        return model

    def save_pretrained(
        self,
        out_dir: str | Path,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int | None = None,
        *,
        is_writer: bool = True,
    ) -> Path:
        """Write config.json and safetensors shards that transformers.MistralForCausalLM loads unchanged,
        replacing `out_dir`. Sharded (DTensor) parameters are gathered one at a time, so every rank
        must call this; only the one with `is_writer` writes."""
        from mistral_lightning.checkpoint.base import ModelWeights
        from mistral_lightning.checkpoint.hf import save_hf

        return save_hf(
            ModelWeights(self),
            out_dir,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            overwrite=True,
            is_writer=is_writer,
        )
