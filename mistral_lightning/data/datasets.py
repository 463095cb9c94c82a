"""Map-style datasets over Megatron indexed data, the resumable data-parallel sampler and the padding collate.

Every item is a dict of 1-D int64 tensors already shifted for next-token loss: `labels[t]` is the target for
`input_ids[t]` (-100: no loss), `position_ids` restart per document, and `document_ids` (when present) say
which tokens may attend to each other. `pad_collate` turns items into the batch contract of the trainer.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from mistral_lightning.data.indexed import IndexedDataset, bin_path
from mistral_lightning.errors import UserError
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.outputs import NewFile

SPLIT_NAMES = ("train", "validation", "test")
# After a preprocess --output-prefix, the name of each instruction or preference dataset (`{}`: its key).
PACKED_SUFFIX = "_packed_{}_document"
PAD_VALUES = {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0, "document_ids": -1}


# ---------------------------------------------------------------- splits and cached indices


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalized train/validation/test weights (missing parts are 0)."""
    try:
        parts = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise UserError(
            f"split {split!r} must be up to three non-negative numbers with a positive sum, e.g. '969,30,1'"
        )
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_bounds(size: int, weights: Sequence[float]) -> list[int]:
    """Split edges over `size` items as megatron-core computes them: round(cumulative weight * size)."""
    return [int(round(edge * size)) for edge in itertools.accumulate(weights, initial=0.0)]


def _write_atomically(path: Path, write: Callable) -> None:
    """Write through a new temporary file of this process's own (outputs.NewFile), then rename: builders on
    several nodes can share a filesystem, so none writes a file another writes, and readers see whole files
    only; concurrent builders write identical bytes, and the last rename wins harmlessly."""
    with NewFile(path) as stream:
        write(stream)


def cached_arrays(
    cache_dir: Path | None, description: str, names: Sequence[str], build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arrays built for `description`, loaded from `cache_dir` if there, else built and saved atomically."""
    if cache_dir is None:
        return build()
    stem = hashlib.sha256(description.encode()).hexdigest()[:20]
    paths = {name: cache_dir / f"{stem}_{name}.npy" for name in names}
    if all(path.is_file() for path in paths.values()):
        return {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    arrays = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The description says what the hashed name stands for.
        _write_atomically(
            cache_dir / f"{stem}.txt", lambda stream: stream.write((description + "\n").encode())
        )
        for name, path in paths.items():
            _write_atomically(path, partial(np.save, arr=arrays[name]))
    except OSError as error:
        raise UserError(
            f"cannot write the index cache in {cache_dir} ({error}); set cache_dir to a writable folder"
        ) from error
    return arrays


def largest_token_id(indexed: IndexedDataset, cache_dir: Path | None) -> int:
    """The largest id in `indexed` (-1 if none), scanned once and cached with the index caches."""
    data = bin_path(indexed.prefix)
    stat = data.stat()
    # Keyed by the file as it is now: rewriting the data (a new size or mtime) scans it again.
    description = f"largest value of {data.name} size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
    arrays = cached_arrays(
        cache_dir, description, ("largest",), lambda: {"largest": np.array(indexed.largest_value())}
    )
    return int(arrays["largest"])


# ---------------------------------------------------------------- pretraining: GPT packing


class GPTPackedDataset(Dataset):
    """Samples of seq_length+1 tokens cut across documents, Megatron GPTDataset style (one pass over the split).

    doc_idx: the split's documents in a seeded order; sample_idx[i] = (position in doc_idx, offset) where
    sample i starts (it ends where sample i+1 starts, plus one token); shuffle_idx: the seeded sample order.
    """

    INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: range,
        seq_length: int,
        seed: int,
        cache_dir: Path | None,
        cross_document_attention: bool = False,
    ) -> None:
        self.indexed, self.seq_length = indexed, seq_length
        self.cross_document_attention = cross_document_attention
        lengths = indexed.sequence_lengths[documents.start : documents.stop]
        # The indices depend only on the document lengths, so their hash says when a cache is still valid.
        description = (
            f"GPTPackedDataset {os.path.basename(indexed.prefix)} documents {documents.start}:{documents.stop} "
            f"seq_length={seq_length} seed={seed} lengths_sha256={hashlib.sha256(lengths.tobytes()).hexdigest()}"
        )
        indices = cached_arrays(
            cache_dir, description, self.INDEX_NAMES, lambda: self._build_indices(documents, seed)
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = (indices[name] for name in self.INDEX_NAMES)

    def _build_indices(self, documents: range, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        doc_idx = rng.permutation(np.arange(documents.start, documents.stop, dtype=np.int64))
        starts = np.zeros(len(doc_idx) + 1, dtype=np.int64)
        np.cumsum(self.indexed.sequence_lengths[doc_idx], out=starts[1:])
        num_samples = max(int(starts[-1]) - 1, 0) // self.seq_length
        sample_starts = np.arange(num_samples + 1, dtype=np.int64) * self.seq_length
        position = np.searchsorted(starts, sample_starts, side="right") - 1
        sample_idx = np.stack([position, sample_starts - starts[position]], axis=1)
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": rng.permutation(num_samples)}

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        position, offset = (int(v) for v in self.sample_idx[self.shuffle_idx[index]])
        pieces, remaining = [], self.seq_length + 1
        while remaining:
            document = int(self.doc_idx[position])
            take = min(int(self.indexed.sequence_lengths[document]) - offset, remaining)
            pieces.append(self.indexed.get(document, offset, take))
            remaining -= take
            position, offset = position + 1, 0
        tokens = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        input_ids, labels = tokens[:-1], tokens[1:].clone()
        if self.cross_document_attention:
            return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(self.seq_length)}
        document_ids = torch.cat([torch.full((len(p),), k) for k, p in enumerate(pieces)])
        # A token never predicts the first token of the next document: it cannot see that document.
        labels[document_ids[1:] != document_ids[:-1]] = IGNORE_INDEX
        position_ids = torch.cat([torch.arange(len(p)) for p in pieces])
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids[:-1],
            "document_ids": document_ids[:-1],
        }


class BlendedDataset(Dataset):
    """Interleaves datasets in proportion to `weights`, deterministically; its length is the sum of theirs.

    A dataset whose weight exceeds its share of the samples is repeated (modulo its length).
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float]) -> None:
        self.datasets = list(datasets)
        total = sum(len(d) for d in datasets)
        shares = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        counts = np.floor(shares * total).astype(np.int64)
        counts[np.argmax(shares)] += total - counts.sum()
        # Sample k of dataset d is due at time (k + 0.5) / count_d; merging by that time interleaves evenly.
        due = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
        which = np.concatenate([np.full(c, d) for d, c in enumerate(counts) if c])
        local = np.concatenate([np.arange(c) for c in counts if c])
        order = np.argsort(due, kind="stable")
        self.dataset_index, self.sample_index = which[order], local[order]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        dataset = self.datasets[int(self.dataset_index[index])]
        return dataset[int(self.sample_index[index]) % len(dataset)]


# ---------------------------------------------------------------- instruction fine-tuning


class InstructionDataset(Dataset):
    """Samples from `<prefix>_packed_{input_ids,labels}_document`, one per item or several packed together.

    Each sample of n tokens gives n-1 shifted positions (truncated to seq_length). With `pack`, consecutive
    samples of the seeded order fill sequences of up to seq_length positions; attention and position ids
    restart per sample.
    """

    def __init__(
        self,
        input_ids: IndexedDataset,
        labels: IndexedDataset,
        samples: np.ndarray,
        seq_length: int,
        seed: int,
        pack: bool = False,
    ) -> None:
        self.input_ids, self.labels, self.seq_length = input_ids, labels, seq_length
        samples = np.random.default_rng(seed).permutation(np.asarray(samples, dtype=np.int64))
        # A one-token sample has nothing to predict.
        samples = samples[input_ids.sequence_lengths[samples] >= 2]
        lengths = np.minimum(input_ids.sequence_lengths[samples].astype(np.int64) - 1, seq_length)
        self.groups = (
            _pack_greedily(samples, lengths, seq_length)
            if pack
            else [samples[i : i + 1] for i in range(len(samples))]
        )

    def __len__(self) -> int:
        return len(self.groups)

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = min(int(self.input_ids.sequence_lengths[index]), self.seq_length + 1)
        return _shifted(self.input_ids, self.labels, index, length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _packed_item([self._sample(int(sample)) for sample in self.groups[index]])


def _shifted(
    input_ids: IndexedDataset, labels: IndexedDataset, index: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` tokens of sample `index`, shifted for next-token loss: (ids[:-1], labels[1:])."""
    ids = torch.from_numpy(input_ids.get(index, 0, length).astype(np.int64))
    targets = torch.from_numpy(labels.get(index, 0, length).astype(np.int64))
    return ids[:-1], targets[1:]


def _packed_item(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Shifted (ids, labels) pieces side by side: document k is piece k, its positions counted from 0."""
    return {
        "input_ids": torch.cat([ids for ids, _ in pieces]),
        "labels": torch.cat([labels for _, labels in pieces]),
        "position_ids": torch.cat([torch.arange(len(ids)) for ids, _ in pieces]),
        "document_ids": torch.cat([torch.full((len(ids),), k) for k, (ids, _) in enumerate(pieces)]),
    }


def _pack_greedily(samples: np.ndarray, lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Consecutive samples share a sequence while they fit; order is kept, so the result is deterministic."""
    groups, start, used = [], 0, 0
    for i, length in enumerate(lengths.tolist()):
        if used + length > capacity:
            groups.append(samples[start:i])
            start, used = i, 0
        used += length
    if start < len(samples):
        groups.append(samples[start:])
    return groups


# ---------------------------------------------------------------- preference pairs (DPO)


class PreferenceDataset(Dataset):
    """Preference pairs from `<prefix>_packed_{chosen,rejected}_{input_ids,labels}_document`, aligned by row.

    An item holds one pair, or with `pack` consecutive pairs of the seeded order while they fit in seq_length
    positions. Document 2k of an item is the chosen side of its k-th pair and 2k + 1 the rejected side, each
    whole (a side of n tokens gives n - 1 shifted positions, its position ids counted from 0), so a pair never
    spans items (data/contract.py PreferencePairData). A pair longer than seq_length is refused when the dataset
    is built, never cut.
    """

    def __init__(
        self,
        chosen: tuple[IndexedDataset, IndexedDataset],
        rejected: tuple[IndexedDataset, IndexedDataset],
        pairs: np.ndarray | range,
        seq_length: int,
        seed: int,
        pack: bool = False,
    ) -> None:
        self.chosen, self.rejected, self.seq_length = chosen, rejected, seq_length
        pairs = np.asarray(pairs, dtype=np.int64)
        sides = [side[0].sequence_lengths[pairs].astype(np.int64) for side in (chosen, rejected)]
        # A one-token side has nothing to predict.
        usable = (sides[0] >= 2) & (sides[1] >= 2)
        pairs, sides = pairs[usable], [lengths[usable] for lengths in sides]
        positions = sides[0] - 1 + sides[1] - 1
        self._check_fits(pairs, sides, positions)
        order = np.random.default_rng(seed).permutation(len(pairs))
        pairs, positions = pairs[order], positions[order]
        self.groups = (
            _pack_greedily(pairs, positions, seq_length)
            if pack
            else [pairs[i : i + 1] for i in range(len(pairs))]
        )

    def _check_fits(self, pairs: np.ndarray, sides: list[np.ndarray], positions: np.ndarray) -> None:
        too_long = np.flatnonzero(positions > self.seq_length)
        if not len(too_long):
            return
        first = too_long[np.argmin(pairs[too_long])]  # the lowest row, whatever the split's order
        chosen, rejected, need = (int(lengths[first]) for lengths in (*sides, positions))
        prefix = self.chosen[0].prefix.removesuffix(PACKED_SUFFIX.format("chosen_input_ids"))
        raise UserError(
            f"{prefix}: {len(too_long)} preference pair(s) do not fit data.init_args.seq_length {self.seq_length}, "
            f"e.g. pair {int(pairs[first])}: its chosen side has {chosen} tokens and its rejected side {rejected}, "
            f"{need} positions together ({chosen} - 1 + {rejected} - 1); a pair is never cut or split, so raise "
            f"data.init_args.seq_length to at least {int(positions[too_long].max())}, or preprocess with "
            f"--seq-length at most {self.seq_length // 2} (half of data.init_args.seq_length)"
        )

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pieces = []
        for pair in self.groups[index].tolist():
            for input_ids, labels in (self.chosen, self.rejected):
                pieces.append(_shifted(input_ids, labels, pair, int(input_ids.sequence_lengths[pair])))
        return _packed_item(pieces)


# ---------------------------------------------------------------- batching


def pad_collate(
    items: list[dict[str, torch.Tensor]], seq_length: int, pad_to_multiple_of: int = 8
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item rounded up to `pad_to_multiple_of`, capped at `seq_length`."""
    longest = max(len(item["input_ids"]) for item in items)
    width = min(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of, seq_length)
    batch = {}
    for key in items[0]:
        out = torch.full((len(items), width), PAD_VALUES[key], dtype=torch.int64)
        for row, item in enumerate(items):
            out[row, : len(item[key])] = item[key][:width]
        batch[key] = out
    return batch


class ResumableSampler(DistributedSampler):
    """Sample order shared by all data-parallel ranks, resumable from a global consumed-samples count.

    Each step consumes `micro_batch_size * num_replicas` consecutive entries of the epoch's order; rank r takes
    its r-th slice. The epoch and position follow from `consumed_samples`, which the DataModule advances as
    batches are consumed, so a restarted run continues exactly where the checkpoint was written. Incomplete
    last global batches are dropped. Subclassing DistributedSampler stops Lightning from wrapping it.
    """

    def __init__(
        self,
        dataset: Dataset,
        micro_batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        consumed_samples: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = micro_batch_size * num_replicas
        self.samples_per_epoch = len(dataset) // self.global_batch_size * self.global_batch_size
        self.consumed_samples = consumed_samples

    def _epoch_order(self, epoch: int) -> np.ndarray:
        size = len(self.dataset)
        return (
            np.random.default_rng([self.seed, epoch]).permutation(size) if self.shuffle else np.arange(size)
        )

    def __iter__(self) -> Iterator[int]:
        if self.samples_per_epoch == 0:
            return
        epoch, start = divmod(self.consumed_samples, self.samples_per_epoch)
        order = self._epoch_order(epoch)
        first = self.rank * self.micro_batch_size
        for batch_start in range(start, self.samples_per_epoch, self.global_batch_size):
            yield from order[batch_start + first : batch_start + first + self.micro_batch_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.consumed_samples = int(state_dict["consumed_samples"])

    def __len__(self) -> int:
        if self.samples_per_epoch == 0:
            return 0
        remaining = self.samples_per_epoch - self.consumed_samples % self.samples_per_epoch
        return remaining // self.num_replicas
