"""How a Mistral model is cut into Megatron-LM / ModelLink TP x PP ranks: one plan per rank file.

A plan for one (tp_rank, pp_rank) lists every tensor of that rank's file and, for each, which slices
of which of our parameters it concatenates. Writing builds each tensor from those slices; reading
copies the slices back. One table thus serves both directions, and the grouped QKV interleave, the
per-rank [gate; up] and the vocabulary padding are written down exactly once. The layout is described
in docs/ARCHITECTURE.md, section "Megatron/ModelLink checkpoint layout".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mistral_lightning.checkpoint.base import CheckpointError, Index
from mistral_lightning.config import ConfigError, MistralConfig


@dataclass(frozen=True)
class Piece:
    name: str  # our parameter name, e.g. "layers.0.attn.q.weight"
    index: Index  # the part of it, with explicit bounds up to the concatenation dimension


@dataclass(frozen=True)
class TensorPlan:
    path: tuple[str, ...]  # where the tensor sits under model["language_model"]
    dim: int  # the pieces are concatenated along this dimension
    pieces: tuple[Piece, ...]
    replicated: bool = False  # identical on every TP rank (the norms)
    pad_rows: int = 0  # vocabulary padding: Megatron appends copies of the last real row
    pad_row: Piece | None = None

    def sizes(self) -> Iterator[tuple[Piece, int, int]]:
        """(piece, offset, length) along `dim` inside the rank's tensor."""
        offset = 0
        for piece in self.pieces:
            length = piece.index[self.dim].stop - piece.index[self.dim].start
            yield piece, offset, length
            offset += length

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _rows(start: int, stop: int) -> Index:
    return (slice(start, stop),)


def build_tensor(plan: TensorPlan, read: Callable[[str, Index], torch.Tensor]) -> torch.Tensor:
    """One rank's tensor from slices of our parameters; torch.cat always copies, so no view of a
    larger storage (which torch.save would write whole) escapes."""
    parts = [read(piece.name, piece.index) for piece in plan.pieces]
    if plan.pad_rows:
        parts.append(read(plan.pad_row.name, plan.pad_row.index).expand(plan.pad_rows, -1))
    return torch.cat(parts, dim=plan.dim)


@dataclass(frozen=True)
class MegatronLayout:
    """How a MistralConfig is cut into TP x PP Megatron ranks."""

    config: MistralConfig
    tp: int = 1
    pp: int = 1
    vocab_divisible_by: int = 1  # ModelLink's default; 32000 then needs no padding at TP8

    def __post_init__(self) -> None:
        c = self.config
        for value, option in ((self.tp, "tensor"), (self.pp, "pipeline")):
            if value < 1:
                raise CheckpointError(f"the {option}-parallel size must be at least 1, got {value}")
        if c.num_kv_heads % self.tp:
            raise CheckpointError(
                f"tensor-parallel size {self.tp} does not divide the {c.num_kv_heads} KV groups "
                f"(num_kv_heads): each rank must hold whole groups; pick a --target-tensor-parallel-size "
                f"that divides {c.num_kv_heads}"
            )
        if c.intermediate_size % self.tp:
            raise CheckpointError(
                f"tensor-parallel size {self.tp} does not divide intermediate_size {c.intermediate_size}; "
                "pick another --target-tensor-parallel-size"
            )
        if c.num_layers % self.pp:
            raise CheckpointError(
                f"pipeline-parallel size {self.pp} does not divide the {c.num_layers} layers; pick a "
                "--target-pipeline-parallel-size that does"
            )
        if self.vocab_divisible_by < 1:
            raise CheckpointError(
                f"--make-vocab-size-divisible-by must be at least 1, got {self.vocab_divisible_by}"
            )

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.vocab_divisible_by * self.tp
        return -(-self.config.vocab_size // multiple) * multiple

    def stage_layers(self, pp_rank: int) -> range:
        per_stage = self.config.num_layers // self.pp
        return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)

    def rank_folder(self, tp_rank: int, pp_rank: int) -> str:
        return f"mp_rank_{tp_rank:02d}" if self.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"

    def rank_plan(self, tp_rank: int, pp_rank: int) -> list[TensorPlan]:
        """Every tensor of one rank's file, in Megatron's order; encoder layer numbers are stage-local."""
        hidden = self.config.hidden_size
        plans = []
        if pp_rank == 0:
            plans.append(
                self._vocab_plan(("embedding", "word_embeddings", "weight"), "embed.weight", tp_rank)
            )
        for local, layer in enumerate(self.stage_layers(pp_rank)):
            plans += self._layer_plans(local, layer, tp_rank)
        if pp_rank == self.pp - 1:
            norm = (Piece("norm.weight", _rows(0, hidden)),)
            plans.append(TensorPlan(("encoder", "final_norm.weight"), 0, norm, replicated=True))
            plans.append(self._vocab_plan(("output_layer", "weight"), "lm_head.weight", tp_rank))
        return plans

    def _vocab_plan(self, path: tuple[str, ...], name: str, tp_rank: int) -> TensorPlan:
        vocab = self.config.vocab_size
        rows = self.padded_vocab_size // self.tp
        start, stop = tp_rank * rows, (tp_rank + 1) * rows
        real_stop = max(start, min(stop, vocab))
        pieces = (Piece(name, _rows(start, real_stop)),) if real_stop > start else ()
        pad_rows = stop - real_stop
        pad_row = Piece(name, _rows(vocab - 1, vocab)) if pad_rows else None
        return TensorPlan(path, 0, pieces, pad_rows=pad_rows, pad_row=pad_row)

    def _layer_plans(self, local: int, layer: int, tp_rank: int) -> list[TensorPlan]:
        c, tp, r = self.config, self.tp, tp_rank
        ours, theirs = f"layers.{layer}", f"layers.{local}"
        hidden, head_dim = c.hidden_size, c.head_dim
        q_per_group = (c.num_heads // c.num_kv_heads) * head_dim
        groups = c.num_kv_heads // tp
        qkv = []
        for g in range(r * groups, (r + 1) * groups):
            qkv += [
                Piece(f"{ours}.attn.q.weight", _rows(g * q_per_group, (g + 1) * q_per_group)),
                Piece(f"{ours}.attn.k.weight", _rows(g * head_dim, (g + 1) * head_dim)),
                Piece(f"{ours}.attn.v.weight", _rows(g * head_dim, (g + 1) * head_dim)),
            ]
        attn_cols = c.num_heads * head_dim // tp
        ffn = c.intermediate_size // tp

        def plan(name: str, dim: int, *pieces: Piece, replicated: bool = False) -> TensorPlan:
            return TensorPlan(("encoder", f"{theirs}.{name}"), dim, pieces, replicated=replicated)

        def columns(name: str, width: int) -> Piece:
            return Piece(name, (slice(0, hidden), slice(r * width, (r + 1) * width)))

        return [
            plan(
                "input_norm.weight", 0, Piece(f"{ours}.attn_norm.weight", _rows(0, hidden)), replicated=True
            ),
            plan("self_attention.query_key_value.weight", 0, *qkv),
            plan("self_attention.dense.weight", 1, columns(f"{ours}.attn.o.weight", attn_cols)),
            plan(
                "post_attention_norm.weight",
                0,
                Piece(f"{ours}.mlp_norm.weight", _rows(0, hidden)),
                replicated=True,
            ),
            plan(
                "mlp.dense_h_to_4h.weight",
                0,
                Piece(f"{ours}.mlp.gate.weight", _rows(r * ffn, (r + 1) * ffn)),
                Piece(f"{ours}.mlp.up.weight", _rows(r * ffn, (r + 1) * ffn)),
            ),
            plan("mlp.dense_4h_to_h.weight", 1, columns(f"{ours}.mlp.down.weight", ffn)),
        ]

    # ------------------------------------------------------------ args Namespace
    def args(self, dtype: torch.dtype, iteration: int) -> argparse.Namespace:
        """The settings Megatron's load_checkpoint / check_checkpoint_args and its converters read back."""
        c = self.config
        return argparse.Namespace(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=None,
            num_layers_per_virtual_pipeline_stage=None,
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            ffn_hidden_size=c.intermediate_size,
            num_attention_heads=c.num_heads,
            group_query_attention=c.num_kv_heads != c.num_heads,
            num_query_groups=c.num_kv_heads,
            kv_channels=c.head_dim,
            seq_length=c.max_seq_length,
            max_position_embeddings=c.max_seq_length,
            vocab_size=c.vocab_size,
            padded_vocab_size=self.padded_vocab_size,
            make_vocab_size_divisible_by=self.vocab_divisible_by,
            norm_epsilon=c.rms_norm_eps,
            rotary_base=c.rope_theta,
            sliding_window=c.sliding_window,
            init_method_std=c.initializer_range,
            params_dtype=dtype,
            fp16=dtype == torch.float16,
            bf16=dtype == torch.bfloat16,
            swiglu=True,
            untie_embeddings_and_output_weights=True,
            add_bias_linear=False,
            add_qkv_bias=False,
            position_embedding_type="rope",
            use_rotary_position_embeddings=True,
            add_position_embedding=False,
            rotary_percent=1.0,
            normalization="RMSNorm",
            apply_layernorm_1p=False,
            apply_query_key_layer_scaling=False,
            use_mcore_models=False,
            iteration=iteration,
            consumed_train_samples=0,
            consumed_valid_samples=0,
        )


def config_from_args(args: argparse.Namespace, source: str) -> MistralConfig:
    """The model a Megatron checkpoint's args describe (the unpadded vocabulary when args record it)."""
    missing = [
        key
        for key in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "padded_vocab_size",
        )
        if getattr(args, key, None) is None
    ]
    if missing:
        raise CheckpointError(
            f"{source}: args lack {missing}; pass --model-config PRESET_OR_HF_DIR to describe the model"
        )
    heads = args.num_attention_heads
    grouped = getattr(args, "group_query_attention", False)
    try:
        return MistralConfig(
            vocab_size=getattr(args, "vocab_size", None) or args.padded_vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=args.ffn_hidden_size,
            num_layers=args.num_layers,
            num_heads=heads,
            num_kv_heads=(getattr(args, "num_query_groups", None) or heads) if grouped else heads,
            head_dim=getattr(args, "kv_channels", None) or args.hidden_size // heads,
            rms_norm_eps=getattr(args, "norm_epsilon", None) or getattr(args, "layernorm_epsilon", 1e-5),
            rope_theta=getattr(args, "rotary_base", None) or 10000.0,
            sliding_window=getattr(args, "sliding_window", None),
            max_seq_length=getattr(args, "max_position_embeddings", None) or args.seq_length,
            initializer_range=getattr(args, "init_method_std", None) or 0.02,
        )
    except ConfigError as err:
        raise CheckpointError(f"{source}: args describe no valid Mistral model ({err})") from err


__all__ = ["MegatronLayout", "Piece", "TensorPlan", "build_tensor", "config_from_args"]
