"""LightningDataModules for pretraining (GPT packing), instruction fine-tuning and preference pairs (DPO) over
Megatron indexed data.

Batches are dicts of [B, T] int64 tensors: `input_ids`, `labels` (already shifted; -100 = no loss),
`position_ids`, and `document_ids` (tokens attend only to earlier tokens of the same id; padding is -1).
The training position (consumed samples) is saved in Lightning checkpoints twice: by the DataModule's
`state_dict()`, and by the train DataLoader's, which Lightning's fit loop saves with its own state; having one
is what tells Lightning that the loader resumes mid-epoch.
"""

from __future__ import annotations

import abc
import functools
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mistral_lightning.data.contract import model_sliding_window, model_vocab_size
from mistral_lightning.data.datasets import (
    PACKED_SUFFIX,
    SPLIT_NAMES,
    BlendedDataset,
    GPTPackedDataset,
    InstructionDataset,
    PreferenceDataset,
    ResumableSampler,
    largest_token_id,
    pad_collate,
    parse_split,
    split_bounds,
)
from mistral_lightning.data.indexed import IndexedDataset, bin_path, idx_path
from mistral_lightning.data.preprocess.preference import PREFERENCE_KEYS
from mistral_lightning.distributed import context_parallel_layout, context_shard, data_parallel_layout
from mistral_lightning.errors import UserError
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.outputs import user_path

# fit refuses to start when more than this fraction of the first training samples has no labelled token.
MAX_UNLABELLED_FRACTION = 0.5
LABEL_CHECK_SAMPLES = 128


class EmptySplitError(UserError):
    """`validate` or `test` was asked to run on a split without one batch of samples."""


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is its ResumableSampler's consumed-sample count (Lightning's stateful-loader
    interface: the fit loop saves `state_dict()` in checkpoints and restores it before iterating)."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.load_state_dict(state_dict)


# The command that runs each evaluation split, for the error when that split is empty.
EVAL_COMMANDS = {"validation": "validate", "test": "test"}


class _ResumableDataModule(L.LightningDataModule, abc.ABC):
    """Shared plumbing: per-split datasets, data-parallel sampling from the strategy, consumed-sample state."""

    preference_pairs = False  # whether rows hold preference pairs (data/contract.py PreferencePairData)

    def __init__(
        self, seq_length: int, micro_batch_size: int, split: str, seed: int, num_workers: int
    ) -> None:
        super().__init__()
        if seq_length < 1 or micro_batch_size < 1:
            raise UserError(
                f"seq_length ({seq_length}) and micro_batch_size ({micro_batch_size}) must be positive"
            )
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.split, self.split_weights = split, parse_split(split)
        self.seed, self.num_workers = seed, num_workers
        self.pad_to_multiple_of = 8
        self.consumed_samples = 0
        self.datasets: dict[str, Dataset] = {}
        self._train_sampler: ResumableSampler | None = None

    @abc.abstractmethod
    def build_datasets(self) -> dict[str, Dataset]:
        """Datasets for the non-empty splits among SPLIT_NAMES."""

    @abc.abstractmethod
    def token_datasets(self) -> list[tuple[IndexedDataset, Path]]:
        """The indexed datasets that hold token ids (inputs and labels), each with its index-cache folder."""

    def prepare_data(self) -> None:
        # Runs once per node first, so that the index caches exist before other ranks read them.
        self.build_datasets()
        self._largest_token_ids()

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.build_datasets()
        self._check_vocabulary()
        if stage == "fit":
            self._check_labels()

    def _cache_folder(self, prefix: str) -> Path:
        """Where the index caches of `prefix` live: `cache_dir`, or `index-cache/` next to the data."""
        return Path(self.cache_dir) if self.cache_dir else idx_path(prefix).parent / "index-cache"

    def _largest_token_ids(self) -> list[tuple[IndexedDataset, int]]:
        return [(indexed, largest_token_id(indexed, cache)) for indexed, cache in self.token_datasets()]

    def _check_vocabulary(self) -> None:
        """Token ids at or above the model's vocabulary are refused now, not when a batch reaches them."""
        vocab_size = model_vocab_size(self.trainer)
        if vocab_size is None:
            return
        for indexed, largest in self._largest_token_ids():
            if largest >= vocab_size:
                raise UserError(
                    f"{bin_path(indexed.prefix)} holds token id {largest} but the model has only {vocab_size} "
                    f"ids (0-{vocab_size - 1}); preprocess the data with the model's own tokenizer, or use a "
                    "model whose vocab_size covers it"
                )

    def _check_labels(self) -> None:
        """Refuse to train when most of the first samples have no labelled token (their loss would be 0)."""
        train = self.datasets["train"]
        order = ResumableSampler(train, micro_batch_size=1, seed=self.seed)  # the epoch-0 order of every run
        first = list(itertools.islice(order, LABEL_CHECK_SAMPLES))
        unlabelled = sum(not bool((train[i]["labels"] != IGNORE_INDEX).any()) for i in first)
        if first and unlabelled > MAX_UNLABELLED_FRACTION * len(first):
            raise UserError(
                f"{unlabelled} of the first {len(first)} training samples ({unlabelled / len(first):.0%}) have no "
                f"labelled token at data.init_args.seq_length {self.seq_length}: the prompt fills them, so "
                "training would learn nothing; raise data.init_args.seq_length, or preprocess with the default "
                "--overlong skip (and --seq-length) so that such samples are dropped instead of truncated"
            )

    def _data_parallel(self) -> tuple[int, int]:
        """(size, rank) of data parallelism; tensor-parallel peers report the same rank, so they get the same batch."""
        return data_parallel_layout(None if self.trainer is None else self.trainer.strategy)

    def _dataloader(self, split: str, sampler: ResumableSampler) -> ResumableDataLoader:
        # Under context parallelism a batch's length must split into equal parts (2 per rank when zig-zag).
        size, _ = context_parallel_layout(None if self.trainer is None else self.trainer.strategy)
        multiple = math.lcm(self.pad_to_multiple_of, 2 * size)
        return ResumableDataLoader(
            self.datasets[split],
            batch_size=self.micro_batch_size,
            sampler=sampler,
            # A partial of a plain function: picklable for worker processes, unlike a bound method of this module.
            collate_fn=functools.partial(
                pad_collate, seq_length=self.seq_length, pad_to_multiple_of=multiple
            ),
            num_workers=self.num_workers,
            pin_memory=torch.accelerator.is_available(),  # CUDA and Ascend alike (torch_npu registers npu)
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._data_parallel()
        self._train_sampler = ResumableSampler(
            self.datasets["train"],
            self.micro_batch_size,
            replicas,
            rank,
            self.consumed_samples,
            True,
            self.seed,
        )
        if self._train_sampler.samples_per_epoch == 0:
            raise UserError(
                f"the train split has {len(self.datasets['train'])} samples, fewer than one global batch "
                f"(micro_batch_size {self.micro_batch_size} x {replicas} data-parallel ranks); add data or lower them"
            )
        return self._dataloader("train", self._train_sampler)

    def _eval_dataloader(self, split: str) -> DataLoader | list:
        replicas, rank = self._data_parallel()
        dataset = self.datasets.get(split, [])
        sampler = ResumableSampler(dataset, self.micro_batch_size, replicas, rank, 0, False)
        # During fit an empty split only means no validation; a `validate` or `test` run would report nothing.
        command = EVAL_COMMANDS[split]
        if sampler.samples_per_epoch == 0 and self.trainer is not None and self.trainer.state.fn == command:
            raise EmptySplitError(
                f"`{command}` has nothing to run: the {split} split holds {len(dataset)} samples, fewer than one "
                f"batch (micro_batch_size {self.micro_batch_size} x {replicas} data-parallel ranks), with "
                f"data.init_args.split {self.split!r} (train,validation,test); give the {split} split a share, "
                f"e.g. --data.init_args.split {'98,2,0' if split == 'validation' else '98,1,1'}"
            )
        return self._dataloader(split, sampler) if split in self.datasets else []

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        strategy = None if self.trainer is None else self.trainer.strategy
        size, rank = context_parallel_layout(strategy)
        if size > 1 and not self.trainer.predicting:
            batch = context_shard(batch, rank, size, model_sliding_window(self.trainer))
        # Counted when a training batch reaches the device, i.e. is consumed, not when a worker prefetches it.
        if self.trainer is not None and self.trainer.training:
            replicas, _ = self._data_parallel()
            # The sampler's count is the one the fit loop restores (ResumableDataLoader.load_state_dict).
            sampler = self._train_sampler
            previous = self.consumed_samples if sampler is None else sampler.consumed_samples
            self.consumed_samples = previous + self.micro_batch_size * replicas
            if sampler is not None:
                sampler.consumed_samples = self.consumed_samples
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_samples = int(state_dict["consumed_samples"])
        if self._train_sampler is not None:
            self._train_sampler.consumed_samples = self.consumed_samples


def _split_ranges(size: int, weights: list[float]) -> dict[str, range]:
    bounds = split_bounds(size, weights)
    return {
        name: range(bounds[i], bounds[i + 1])
        for i, name in enumerate(SPLIT_NAMES)
        if bounds[i + 1] > bounds[i]
    }


class PretrainDataModule(_ResumableDataModule):
    """GPT-style packed pretraining data from one or more `<prefix>_text_document` datasets, blended by weight.

    Args:
        data_prefixes: indexed dataset prefixes (without .bin/.idx), e.g. `dataset/alpaca_text_document`.
        blend_weights: one weight per prefix (default: proportional to their sizes).
        seq_length: tokens per sample; each sample reads seq_length + 1 tokens, cut across documents.
        micro_batch_size: samples per device per step.
        split: train/validation/test proportions over documents, e.g. "969,30,1".
        seed: fixes the document order, sample order and per-epoch shuffles.
        cross_document_attention: True lets tokens attend across document boundaries (Megatron's default);
            False (default) restarts attention, position ids and loss at each document.
        cache_dir: where document/sample/shuffle indices are cached (default: `index-cache/` next to the data).
    """

    def __init__(
        self,
        data_prefixes: list[str],
        blend_weights: list[float] | None = None,
        seq_length: int = 4096,
        micro_batch_size: int = 1,
        split: str = "969,30,1",
        seed: int = 1234,
        num_workers: int = 2,
        cross_document_attention: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(seq_length, micro_batch_size, split, seed, num_workers)
        if not data_prefixes:
            raise UserError(
                "PretrainDataModule.data_prefixes is empty; give at least one <prefix>_text_document"
            )
        if blend_weights is not None and (len(blend_weights) != len(data_prefixes) or min(blend_weights) < 0):
            raise UserError(
                f"blend_weights needs one non-negative weight per data prefix ({len(data_prefixes)}), got {blend_weights}"
            )
        self.data_prefixes = [user_path(prefix) for prefix in data_prefixes]
        self.blend_weights = blend_weights
        self.cross_document_attention, self.cache_dir = cross_document_attention, cache_dir

    @property
    def fixed_width(self) -> bool:
        return True  # every sample is seq_length tokens

    def token_datasets(self) -> list[tuple[IndexedDataset, Path]]:
        return [(IndexedDataset(prefix), self._cache_folder(prefix)) for prefix in self.data_prefixes]

    def build_datasets(self) -> dict[str, Dataset]:
        per_split: dict[str, list[tuple[float, GPTPackedDataset]]] = {}
        for index, prefix in enumerate(self.data_prefixes):
            indexed = IndexedDataset(prefix)
            cache = self._cache_folder(prefix)
            for name, documents in _split_ranges(len(indexed), self.split_weights).items():
                dataset = GPTPackedDataset(
                    indexed, documents, self.seq_length, self.seed, cache, self.cross_document_attention
                )
                weight = len(dataset) if self.blend_weights is None else self.blend_weights[index]
                if len(dataset) and weight > 0:
                    per_split.setdefault(name, []).append((weight, dataset))
        if "train" not in per_split:
            raise UserError(
                f"no training samples of seq_length {self.seq_length}+1 tokens in {self.data_prefixes} with split "
                f"{self.split_weights}; add data, lower seq_length or give the train split more weight"
            )
        return {
            name: parts[0][1]
            if len(parts) == 1
            else BlendedDataset([d for _, d in parts], [w for w, _ in parts])
            for name, parts in per_split.items()
        }


class InstructionDataModule(_ResumableDataModule):
    """Instruction fine-tuning data from `<prefix>_packed_{input_ids,labels}_document`.

    Args:
        data_prefix: the preprocess `--output-prefix` (e.g. `finetune_dataset/alpaca`); the full
            `<prefix>_packed_input_ids_document` is accepted too.
        seq_length: most tokens per sequence; longer samples are truncated (preprocess can skip them instead).
        micro_batch_size: sequences per device per step.
        split: train/validation/test proportions over samples, e.g. "969,30,1".
        seed: fixes the sample order and the per-epoch shuffles.
        pack: put several samples in one sequence (attention and position ids restart per sample).
        pad_to_multiple_of: batches are padded to the longest sequence rounded up to this, capped at seq_length.
        cache_dir: where facts computed once from the data (the largest token id) are cached (default:
            `index-cache/` next to the data).
    """

    first_key = "input_ids"  # the dataset whose full name data_prefix may be given as

    def __init__(
        self,
        data_prefix: str,
        seq_length: int = 4096,
        micro_batch_size: int = 1,
        split: str = "969,30,1",
        seed: int = 1234,
        num_workers: int = 2,
        pack: bool = False,
        pad_to_multiple_of: int = 8,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(seq_length, micro_batch_size, split, seed, num_workers)
        if pad_to_multiple_of < 1:
            raise UserError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.data_prefix = user_path(data_prefix).removesuffix(PACKED_SUFFIX.format(self.first_key))
        self.pack, self.pad_to_multiple_of, self.cache_dir = pack, pad_to_multiple_of, cache_dir

    @property
    def fixed_width(self) -> bool:
        return self.pad_to_multiple_of >= self.seq_length  # every batch padded to seq_length

    def _indexed(self) -> tuple[IndexedDataset, IndexedDataset]:
        """The input-id and label datasets of `data_prefix`."""
        return tuple(
            IndexedDataset(self.data_prefix + PACKED_SUFFIX.format(key)) for key in ("input_ids", "labels")
        )

    def token_datasets(self) -> list[tuple[IndexedDataset, Path]]:
        return [(indexed, self._cache_folder(self.data_prefix)) for indexed in self._indexed()]

    def build_datasets(self) -> dict[str, Dataset]:
        input_ids, labels = self._indexed()
        if len(input_ids) != len(labels) or (input_ids.sequence_lengths != labels.sequence_lengths).any():
            raise UserError(
                f"{input_ids.prefix} and {labels.prefix} disagree on sample lengths; they come from different "
                "preprocess runs, re-run preprocess"
            )
        return self._split_datasets(
            len(input_ids),
            lambda samples: InstructionDataset(
                input_ids, labels, samples, self.seq_length, self.seed, self.pack
            ),
            "sample",
        )

    def _split_datasets(self, count: int, build: Callable[[range], Dataset], unit: str) -> dict[str, Dataset]:
        """`build`'s dataset of each split of `count` items, the empty ones left out; the train split must hold
        a usable `unit`."""
        datasets = {}
        for name, items in _split_ranges(count, self.split_weights).items():
            dataset = build(items)
            if len(dataset):
                datasets[name] = dataset
        if "train" not in datasets:
            raise UserError(
                f"{self.data_prefix}: the train split holds no usable {unit}; check the data and split"
            )
        return datasets


class PreferenceDataModule(InstructionDataModule):
    """Preference pairs (DPO) from `<prefix>_packed_{chosen,rejected}_{input_ids,labels}_document`.

    In every row, document 2k is the chosen side of the row's k-th pair and 2k + 1 the rejected side (prompt
    and answer, labelled on the answer only; data/contract.py PreferencePairData); a pair never spans rows.

    Args:
        data_prefix: the preprocess `--output-prefix` of a `--handler preference` run (e.g.
            `finetune_dataset/prefs`); the full `<prefix>_packed_chosen_input_ids_document` is accepted too.
        seq_length: most positions per row; a pair whose two sides (n tokens give n - 1 positions each) exceed
            it is refused when the data is set up, never cut (preprocess with --seq-length at most half of it).
        micro_batch_size: rows per device per step (each row holds one pair, or several with pack).
        split: train/validation/test proportions over pairs, e.g. "969,30,1".
        seed: fixes the pair order and the per-epoch shuffles.
        pack: put several whole pairs in one row (attention and position ids restart per side).
        pad_to_multiple_of: batches are padded to the longest row rounded up to this, capped at seq_length.
        cache_dir: where facts computed once from the data (the largest token id) are cached (default:
            `index-cache/` next to the data).
    """

    preference_pairs = True
    first_key = PREFERENCE_KEYS[0]

    def _indexed(self) -> tuple[IndexedDataset, ...]:
        """The chosen input-id and label datasets, then the rejected ones (PREFERENCE_KEYS' order)."""
        return tuple(IndexedDataset(self.data_prefix + PACKED_SUFFIX.format(key)) for key in PREFERENCE_KEYS)

    def build_datasets(self) -> dict[str, Dataset]:
        indexed = self._indexed()
        pairs = [len(dataset) for dataset in indexed]
        if len(set(pairs)) > 1:
            counts = ", ".join(f"{key} {count}" for key, count in zip(PREFERENCE_KEYS, pairs))
            raise UserError(
                f"{self.data_prefix}: the preference datasets hold different numbers of pairs ({counts}); they "
                "come from different preprocess runs, re-run preprocess --handler preference"
            )
        for side, (input_ids, labels) in (("chosen", indexed[:2]), ("rejected", indexed[2:])):
            if (input_ids.sequence_lengths != labels.sequence_lengths).any():
                row = int(np.flatnonzero(input_ids.sequence_lengths != labels.sequence_lengths)[0])
                raise UserError(
                    f"{self.data_prefix}: the {side} input ids and labels disagree on the length of pair {row}; "
                    "they come from different preprocess runs, re-run preprocess --handler preference"
                )
        return self._split_datasets(
            pairs[0],
            lambda pairs_of_split: PreferenceDataset(
                indexed[:2], indexed[2:], pairs_of_split, self.seq_length, self.seed, self.pack
            ),
            "pair",
        )
