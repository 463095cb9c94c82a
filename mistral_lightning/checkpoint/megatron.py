"""Megatron-LM / ModelLink checkpoint files at any TP/PP: writing them rank by rank, reading them back.

Which slices of our parameters each rank file holds comes from megatron_layout.py; the layout is
described in docs/ARCHITECTURE.md, section "Megatron/ModelLink checkpoint layout".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mistral_lightning.checkpoint.base import CheckpointError, Index, WeightSource, load_torch_file
from mistral_lightning.checkpoint.megatron_layout import (
    MegatronLayout,
    TensorPlan,
    build_tensor,
    config_from_args,
)
from mistral_lightning.config import MistralConfig, parameter_shapes
from mistral_lightning.outputs import FolderKind, OutputFolder, OutputTarget, as_target

CHECKPOINT_VERSION = 3.0
TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
RELEASE = "release"
# What a folder save_megatron wrote holds; --overwrite replaces only such a folder.
MEGATRON_OUTPUT = FolderKind(
    "Megatron checkpoint folder",
    patterns=(TRACKER_FILE, f"iter_*/mp_rank_*/{MODEL_FILE}", f"{RELEASE}/mp_rank_*/{MODEL_FILE}"),
    required=TRACKER_FILE,
)


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
    out_dir: OutputTarget | str | Path,
    layout: MegatronLayout,
    *,
    dtype: torch.dtype,
    iteration: int | str = 1,
    overwrite: bool = False,
    progress: Callable[[str], None] = print,
) -> Path:
    """Write `source` as a Megatron checkpoint, one rank file at a time.

    Each rank reads only its own slices from the source, so the peak memory is about one rank's
    share of the model. The folder is written under a temporary name and published as outputs.py
    describes (`overwrite` replaces only a previous Megatron output).
    """
    target = as_target(out_dir, overwrite=overwrite)
    with OutputFolder(target, MEGATRON_OUTPUT) as tmp_dir:
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
            # Through a Python file, so a full disk surfaces as its OSError rather than torch's "unexpected pos".
            with open(rank_dir / MODEL_FILE, "wb") as stream:
                torch.save(state, stream)
            size_mb = (rank_dir / MODEL_FILE).stat().st_size / 1e6
            progress(
                f"[{done}/{len(ranks)}] wrote {layout.rank_folder(tp, pp)}/{MODEL_FILE} ({size_mb:.1f} MB)"
            )
            del language_model, state
        (tmp_dir / TRACKER_FILE).write_text(f"{iteration}\n")
    return target.path


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
                'layout (docs/ARCHITECTURE.md, section "Megatron/ModelLink checkpoint layout") is supported, '
                "not Megatron-Core or virtual pipelines"
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

    @property
    def dtype(self) -> torch.dtype:
        return self._rank_tensors(0, ("embedding", "word_embeddings", "weight"))[0].dtype

    def stored_name(self, name: str) -> str:
        return name

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
    "MEGATRON_OUTPUT",
    "MODEL_FILE",
    "TRACKER_FILE",
    "MegatronCheckpoint",
    "save_megatron",
]
