"""Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`): an atomic writer and a validating mmap reader.

Layout of `.idx` (little endian): magic, `<Q` version 1, `<B` dtype code, `<Q` sequence count,
`<Q` document-index count; then int32 sequence lengths, int64 byte pointers into `.bin`, and int64
document indices (first 0, last the sequence count). `.bin` holds the sequences back to back.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

from mistral_lightning.errors import UserError
from mistral_lightning.outputs import NewFile

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}
LABEL_DTYPE = np.int32


class IndexedDatasetError(UserError):
    """An indexed dataset on disk is missing, truncated or not in the Megatron format."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's rule: uint16 while every id fits with margin, int32 otherwise."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Appends documents (one sequence each) to `<prefix>.bin`; `finalize()` writes `.idx` and publishes both.

    Until `finalize()` the files live under temporary names, so a crash never leaves a dataset that looks
    complete. Use as a context manager: an exception discards the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(
                f"dtype {self.dtype} has no Megatron code; use one of {sorted(map(str, CODE_OF_DTYPE))}"
            )
        self.prefix = str(prefix)
        self._bin = NewFile(bin_path(prefix))
        self._idx: NewFile | None = None
        self._lengths = array("i")

    def add_document(self, sequence: np.ndarray | list[int]) -> None:
        self.add_documents(np.asarray(sequence), [len(sequence)])

    def add_documents(self, flat: np.ndarray, lengths: list[int] | np.ndarray) -> None:
        """Many documents at once: `flat` is their concatenation, `lengths` their sizes."""
        values = np.asarray(flat)
        if values.size != int(np.sum(lengths)):
            raise ValueError(f"{values.size} values given for documents totalling {int(np.sum(lengths))}")
        if values.size and np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            if values.min() < info.min or values.max() > info.max:
                raise ValueError(
                    f"values outside {self.dtype} range [{info.min}, {info.max}] for {self.prefix}"
                )
        self._bin.stream.write(values.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.frombytes(np.asarray(lengths, dtype=np.int32).tobytes())

    def finalize(self) -> None:
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        self._idx = NewFile(idx_path(self.prefix))
        self._idx.stream.write(
            HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], len(lengths), len(document_indices))
        )
        for part in (lengths, pointers, document_indices):
            self._idx.stream.write(part.tobytes(order="C"))
        # .bin first: a reader only trusts a dataset whose .idx exists.
        self._bin.commit()
        self._idx.commit()

    def abort(self) -> None:
        for file in (self._bin, self._idx):
            if file is not None:
                file.discard()

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader; `dataset[i]` is sequence i as a read-only numpy view."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        index_file, data_file = idx_path(prefix), bin_path(prefix)
        for path in (index_file, data_file):
            if not path.is_file():
                raise IndexedDatasetError(
                    f"{path} not found: an indexed dataset needs both {index_file.name} and {data_file.name}; "
                    "check the data prefix (without .bin/.idx) or run `mistral-lightning preprocess`"
                )
        index_size = index_file.stat().st_size
        if index_size < HEADER.size:
            state = (
                "empty" if index_size == 0 else f"truncated ({index_size} bytes, header needs {HEADER.size})"
            )
            raise IndexedDatasetError(f"{index_file} is {state}; re-run preprocessing")
        index = np.memmap(index_file, mode="r", dtype=np.uint8)
        magic, version, code, sequence_count, document_count = HEADER.unpack(index[: HEADER.size].tobytes())
        if magic != MAGIC:
            raise IndexedDatasetError(
                f"{index_file} is not a Megatron index (magic {magic!r}, expected {MAGIC!r})"
            )
        if version != VERSION:
            raise IndexedDatasetError(
                f"{index_file} has index version {version}; only version {VERSION} is supported"
            )
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{index_file} has unknown dtype code {code}; known: {sorted(DTYPE_CODES)}"
            )
        expected = HEADER.size + sequence_count * (4 + 8) + document_count * 8
        if index.size != expected:
            raise IndexedDatasetError(
                f"{index_file} is {index.size} bytes but its header ({sequence_count} sequences, "
                f"{document_count} document indices) implies {expected}; the file is truncated or corrupt, "
                "re-run preprocessing"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(index, np.int32, sequence_count, offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(index, np.int64, sequence_count, offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(index, np.int64, document_count, offset)
        self._check_consistency(index_file, data_file)
        # numpy cannot map an empty file; an index of no sequences comes with an empty .bin.
        self._data = np.memmap(data_file, mode="r", dtype=np.uint8) if len(self) else np.zeros(0, np.uint8)

    def _check_consistency(self, index_file: Path, data_file: Path) -> None:
        docs = self.document_indices
        if docs.size == 0 or docs[0] != 0 or docs[-1] != len(self) or np.any(np.diff(docs) < 0):
            raise IndexedDatasetError(f"{index_file} has invalid document indices; the file is corrupt")
        data_size = data_file.stat().st_size
        end = (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if len(self)
            else 0
        )
        if end != data_size:
            raise IndexedDatasetError(
                f"{data_file} is {data_size} bytes but {index_file} describes {end}; the pair is truncated or "
                "mismatched, re-run preprocessing"
            )
        # Every sequence must lie inside .bin, or a batch far into training would read garbage or fail.
        lengths, pointers = self.sequence_lengths.astype(np.int64), self.sequence_pointers
        outside = (lengths < 0) | (pointers < 0) | (lengths * self.dtype.itemsize > data_size - pointers)
        if outside.any():
            bad = int(np.argmax(outside))
            start, size = int(pointers[bad]), int(lengths[bad]) * self.dtype.itemsize
            what = (
                f"gives sequence {bad} a negative length ({lengths[bad]})"
                if lengths[bad] < 0
                else f"places sequence {bad} at bytes {start}-{start + size} of {data_file.name}, which has {data_size}"
            )
            raise IndexedDatasetError(f"{index_file} {what}; the file is corrupt, re-run preprocessing")

    def __getstate__(self) -> dict:
        # Reopen by name in worker processes instead of pickling the mapped arrays.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `index`."""
        size = int(self.sequence_lengths[index])
        length = size - offset if length is None else length
        start = int(self.sequence_pointers[index]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data, self.dtype, length, start)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def largest_value(self) -> int:
        """The largest value stored in `.bin` (-1 when there is none): one pass over the mapped file."""
        values = np.frombuffer(self._data, self.dtype, len(self._data) // self.dtype.itemsize)
        return int(values.max()) if values.size else -1
