"""The Megatron-LM / ModelLink checkpoint layout (DESIGN section 4): per-rank plans, reading and writing.

A plan for one (tp_rank, pp_rank) lists every tensor of that rank's file and, for each, which slices
of which of our parameters it concatenates. Writing builds each tensor from those slices; reading
copies the slices back. One table thus serves both directions, and the grouped QKV interleave, the
per-rank [gate; up] and the vocabulary padding are written down exactly once.
"""

from __future__ import annotations

import argparse
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mistral_lightning.checkpoint.hf import CheckpointError, finish_output_dir, prepare_output_dir
from mistral_lightning.config import ConfigError, MistralConfig
from mistral_lightning.model import parameter_shapes

CHECKPOINT_VERSION = 3.0
TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
RELEASE = "release"

Index = tuple[slice, ...]


class WeightSource(Protocol):
    """A checkpoint that can hand out (slices of) our parameters by name, whatever its layout."""

    config: MistralConfig

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: Index | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- per-rank plans


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


# ---------------------------------------------------------------- files


def load_torch_file(path: Path, *, trust_pickle: bool = False) -> Any:
    """torch.load, memory-mapped so tensors are paged in only when read; pickled code runs only if trusted."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=not trust_pickle)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # Files from torch < 1.6 (legacy format) cannot be memory-mapped.
                return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: holds pickled Python objects besides tensors ({reason}); if you trust where this "
            "checkpoint came from, pass --trust-checkpoint to load it with full unpickling"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err


def _iteration_folder(iteration: int | str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{iteration:07d}"


def _nested_get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _nested_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def save_megatron(
    source: WeightSource,
    out_dir: str | Path,
    layout: MegatronLayout,
    *,
    dtype: torch.dtype,
    iteration: int | str = 1,
    overwrite: bool = False,
    progress: Callable[[str], None] = print,
) -> Path:
    """Write `source` as a Megatron checkpoint, one rank file at a time.

    Each rank reads only its own slices from the source, so the peak memory is about one rank's
    share of the model. The folder appears under its name only when every rank is written.
    """
    out_dir, tmp_dir = prepare_output_dir(out_dir, overwrite)
    try:
        args = layout.args(dtype, 0 if iteration == RELEASE else iteration)
        folder = tmp_dir / _iteration_folder(iteration)
        ranks = [(tp, pp) for pp in range(layout.pp) for tp in range(layout.tp)]
        for done, (tp, pp) in enumerate(ranks, start=1):
            language_model: dict = {}
            for plan in layout.rank_plan(tp, pp):
                _nested_set(language_model, plan.path, build_tensor(plan, source.read).to(dtype))
            rank_dir = folder / layout.rank_folder(tp, pp)
            rank_dir.mkdir(parents=True)
            state = {
                "args": args,
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": args.iteration,
                "model": {"language_model": language_model},
            }
            torch.save(state, rank_dir / MODEL_FILE)
            size_mb = (rank_dir / MODEL_FILE).stat().st_size / 1e6
            progress(
                f"[{done}/{len(ranks)}] wrote {layout.rank_folder(tp, pp)}/{MODEL_FILE} ({size_mb:.1f} MB)"
            )
            del language_model, state
        (tmp_dir / TRACKER_FILE).write_text(f"{iteration}\n")
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return finish_output_dir(tmp_dir, out_dir)


class MegatronCheckpoint:
    """A Megatron/ModelLink checkpoint at any TP/PP, read back into our parameters one at a time.

    Rank files are memory-mapped and kept open only while reads stay within one layer, so pages read
    for earlier layers leave the process: gathering a parameter costs about its own size.
    `model_config` overrides what the args describe (rope theta, window, unpadded vocabulary).
    """

    def __init__(
        self, load_dir: str | Path, *, model_config: MistralConfig | None = None, trust_pickle: bool = False
    ) -> None:
        self.path = Path(load_dir)
        if not self.path.is_dir():
            raise CheckpointError(
                f"{self.path}: not a folder; pass the folder Megatron saved the checkpoint into"
            )
        self.iteration, self.folder = self._find_iteration()
        self._trust = trust_pickle
        first = self._first_rank_file()
        state = load_torch_file(first, trust_pickle=trust_pickle)
        args = state.get("args") if isinstance(state, dict) else None
        if args is None:
            raise CheckpointError(f"{first}: has no 'args'; is this a Megatron checkpoint?")
        if self.iteration is None:
            self.iteration = state.get("iteration", 1)
        self.config = model_config or config_from_args(args, str(first))
        self.layout = MegatronLayout(
            self.config,
            tp=getattr(args, "tensor_model_parallel_size", 1),
            pp=getattr(args, "pipeline_model_parallel_size", 1),
            vocab_divisible_by=getattr(args, "make_vocab_size_divisible_by", None) or 1,
        )
        padded = getattr(args, "padded_vocab_size", None)
        if padded is not None and padded != self.layout.padded_vocab_size:
            raise CheckpointError(
                f"{first}: args say padded_vocab_size={padded}, but vocab_size "
                f"{self.config.vocab_size} padded to a multiple of make_vocab_size_divisible_by x TP gives "
                f"{self.layout.padded_vocab_size}; pass --model-config with the model's real vocabulary size"
            )
        self._shapes = parameter_shapes(self.config)
        self._open_key: tuple | None = None
        self._open: list[dict] = []
        ranks = [(tp, pp) for pp in range(self.layout.pp) for tp in range(self.layout.tp)]
        self._plans = {rank: {plan.path: plan for plan in self.layout.rank_plan(*rank)} for rank in ranks}
        for rank in ranks:  # fail before anything is written
            self._check_keys(rank, self._language_model(*rank))
        # Which stage and tensor hold each of our parameters.
        self._where = {
            piece.name: (rank[1], path)
            for rank, plans in self._plans.items()
            for path, plan in plans.items()
            for piece in plan.pieces
        }

    def _find_iteration(self) -> tuple[int | str | None, Path]:
        tracker = self.path / TRACKER_FILE
        if tracker.is_file():
            text = tracker.read_text().strip()
            if text == RELEASE:
                return RELEASE, self.path / RELEASE
            if not text.isdigit():
                raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
            return int(text), self.path / _iteration_folder(int(text))
        if any(self.path.glob("mp_rank_*")):  # pointed straight at one iter_XXXXXXX folder
            return None, self.path
        raise CheckpointError(
            f"{self.path}: no {TRACKER_FILE}; pass the folder Megatron saved into (holding that file and "
            "iter_XXXXXXX/) or one iter_XXXXXXX folder"
        )

    def _first_rank_file(self) -> Path:
        for name in ("mp_rank_00", "mp_rank_00_000"):
            if (self.folder / name / MODEL_FILE).is_file():
                return self.folder / name / MODEL_FILE
        raise CheckpointError(
            f"{self.folder}: no mp_rank_00/{MODEL_FILE} (or mp_rank_00_000/{MODEL_FILE}); the checkpoint is "
            "incomplete or the iteration in latest_checkpointed_iteration.txt points to a missing folder"
        )

    def _language_model(self, tp: int, pp: int) -> dict:
        file = self.folder / self.layout.rank_folder(tp, pp) / MODEL_FILE
        if not file.is_file():
            first, last = (
                self.layout.rank_folder(0, 0),
                self.layout.rank_folder(self.layout.tp - 1, self.layout.pp - 1),
            )
            raise CheckpointError(
                f"{file} is missing: the args say TP={self.layout.tp} PP={self.layout.pp}, so every rank folder "
                f"from {first} to {last} must be present in {self.folder}"
            )
        model = load_torch_file(file, trust_pickle=self._trust).get("model", {})
        if "language_model" not in model:
            raise CheckpointError(
                f"{file}: no model['language_model'] (found {sorted(model)[:5]}); only the legacy Megatron "
                "layout of DESIGN section 4 is supported, not Megatron-Core or virtual pipelines"
            )
        language_model = model["language_model"]
        if "encoder" not in language_model and "transformer" in language_model:  # checkpoint_version < 3
            language_model["encoder"] = language_model.pop("transformer")
        return language_model

    def _check_keys(self, rank: tuple[int, int], language_model: dict) -> None:
        expected = {path[1] for path in self._plans[rank] if path[0] == "encoder"}
        found = set(language_model.get("encoder") or {})
        if found != expected:
            raise CheckpointError(
                f"{self.folder / self.layout.rank_folder(*rank) / MODEL_FILE}: encoder keys do not match a "
                f"Mistral stage of {len(self.layout.stage_layers(rank[1]))} layers without biases: unexpected "
                f"{sorted(found - expected)[:4]}, missing {sorted(expected - found)[:4]}; check --model-config "
                "or the checkpoint's args"
            )

    def _stage_files(self, pp: int, path: tuple[str, ...]) -> list[dict]:
        """Every TP rank's tensors of stage `pp`, reopened when the reads move to another layer."""
        layer = re.match(r"layers\.\d+\.", path[-1])
        key = (pp, layer.group(0) if layer else path)
        if key != self._open_key:
            self.close()  # unmap the previous layer's pages before mapping the next
            self._open = [self._language_model(tp, pp) for tp in range(self.layout.tp)]
            self._open_key = key
        return self._open

    def _rank_tensors(self, pp: int, path: tuple[str, ...]) -> list[torch.Tensor]:
        """The tensor at `path` from every TP rank of stage `pp`, checked to agree in shape."""
        tensors = []
        for tp in range(self.layout.tp):
            tensor = _nested_get(self._stage_files(pp, path)[tp], path)
            where = self.folder / self.layout.rank_folder(tp, pp)
            if tensor is None:
                raise CheckpointError(
                    f"{where / MODEL_FILE}: missing model['language_model'] entry {'.'.join(path)}"
                )
            if tensors and tensor.shape != tensors[0].shape:
                raise CheckpointError(
                    f"{'.'.join(path)} has shape {list(tensors[0].shape)} in {self.layout.rank_folder(0, pp)} "
                    f"but {list(tensor.shape)} in {where.name}: the ranks of one checkpoint must agree; is a "
                    "rank folder from another checkpoint or parallel size?"
                )
            tensors.append(tensor)
        return tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        """Our parameter `name` (or `[index]` of it), gathered from the TP ranks of its stage."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: no Megatron tensor holds parameter {name!r}")
        pp, path = self._where[name]
        tensors = self._rank_tensors(pp, path)
        full = torch.empty(self._shapes[name], dtype=tensors[0].dtype)
        for tp, tensor in enumerate(tensors):
            plan = self._plans[tp, pp][path]
            if list(tensor.shape) != self._plan_shape(plan):
                raise CheckpointError(
                    f"{self.folder / self.layout.rank_folder(tp, pp)}: {plan.key} has shape {list(tensor.shape)}, "
                    f"but the model config at TP={self.layout.tp} implies {self._plan_shape(plan)}; check "
                    "--model-config or the checkpoint's args"
                )
            for piece, offset, length in plan.sizes():
                if piece.name == name:
                    full[piece.index] = tensor.narrow(plan.dim, offset, length)
            if plan.replicated:
                break
        return full if index is None else full[index]

    def _plan_shape(self, plan: TensorPlan) -> list[int]:
        """The shape a plan's tensor must have on disk."""
        name = (plan.pieces[0] if plan.pieces else plan.pad_row).name
        shape = list(self._shapes[name])
        shape[plan.dim] = sum(length for _, _, length in plan.sizes()) + plan.pad_rows
        return shape

    def close(self) -> None:
        self._open_key, self._open = None, []


__all__ = [
    "CHECKPOINT_VERSION",
    "MODEL_FILE",
    "TRACKER_FILE",
    "MegatronCheckpoint",
    "MegatronLayout",
    "Piece",
    "TensorPlan",
    "WeightSource",
    "build_tensor",
    "config_from_args",
    "load_torch_file",
    "save_megatron",
]
