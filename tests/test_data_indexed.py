"""Megatron .bin/.idx writer and reader: round trips, megatron-core interop both ways, corruption checks."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from mistral_lightning.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    token_dtype,
)

DOCUMENTS = [[1, 5, 7], [1], [1, 2, 3, 4, 5, 6, 100], [9, 9]]
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(DTYPE_CODES[code])
    rng = np.random.default_rng(code)
    if dtype.kind == "f":
        documents = [rng.standard_normal(n).astype(dtype) for n in (3, 1, 8)]
    else:
        info = np.iinfo(dtype)
        documents = [rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype) for n in (3, 1, 8)]
    prefix = tmp_path / "data"
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)
        writer.finalize()

    assert (tmp_path / "data.idx").read_bytes()[17] == code  # dtype byte after magic (9) and version (8)
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == dtype and len(dataset) == 3 and dataset.num_documents == 3
    for index, document in enumerate(documents):
        np.testing.assert_array_equal(dataset[index], document)
    np.testing.assert_array_equal(dataset.get(2, offset=2, length=3), documents[2][2:5])


def test_token_dtype_follows_megatron_rule():
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32


def test_megatron_core_reads_our_files(tmp_path):
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in DOCUMENTS:
            writer.add_document(document)
        writer.finalize()

    reference = MegatronIndexedDataset(prefix)
    assert len(reference) == len(DOCUMENTS)
    np.testing.assert_array_equal(reference.document_indices, np.arange(len(DOCUMENTS) + 1))
    for index, document in enumerate(DOCUMENTS):
        assert reference[index].dtype == np.uint16
        np.testing.assert_array_equal(reference[index], document)


def test_we_read_megatron_core_files(tmp_path):
    prefix = str(tmp_path / "theirs")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for document in DOCUMENTS[:2]:
        builder.add_item(torch.tensor(document))
        builder.end_document()
    # A document of two sequences (Megatron's sentence-split layout).
    builder.add_item(torch.tensor(DOCUMENTS[2]))
    builder.add_item(torch.tensor(DOCUMENTS[3]))
    builder.end_document()
    builder.finalize(f"{prefix}.idx")

    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.int32 and len(dataset) == 4 and dataset.num_documents == 3
    np.testing.assert_array_equal(dataset.document_indices, [0, 1, 2, 4])
    for index, document in enumerate(DOCUMENTS):
        np.testing.assert_array_equal(dataset[index], document)


def test_writer_publishes_only_on_finalize_and_cleans_up_on_error(tmp_path):
    prefix = tmp_path / "partial"
    with pytest.raises(RuntimeError), IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
        assert not (tmp_path / "partial.bin").exists()
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_values_outside_dtype(tmp_path):
    with IndexedDatasetWriter(tmp_path / "x", np.uint16) as writer, pytest.raises(ValueError, match="uint16"):
        writer.add_document([70000])
    with IndexedDatasetWriter(tmp_path / "x", np.int32) as writer:
        writer.add_document([-100, 2])  # labels keep -100
        writer.finalize()


def _write_good(prefix):
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in DOCUMENTS:
            writer.add_document(document)
        writer.finalize()
    return bytearray(open(f"{prefix}.idx", "rb").read())


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda idx: idx.__setitem__(slice(0, 9), b"NOTANIDX\x00"), "magic"),
        (lambda idx: idx.__setitem__(slice(9, 17), struct.pack("<Q", 2)), "version 2"),
        (lambda idx: idx.__setitem__(17, 42), "dtype code 42"),
        (lambda idx: idx.__delitem__(slice(-5, None)), "truncated or corrupt"),
        (lambda idx: idx.__delitem__(slice(20, None)), "truncated"),
        (lambda idx: idx.__setitem__(slice(-8, None), struct.pack("<q", 99)), "document indices"),
        (lambda idx: idx.__delitem__(slice(None)), "empty"),
        # Sequence 1's length (header, then int32 lengths) made negative; the total still matches .bin.
        (
            lambda idx: idx.__setitem__(slice(HEADER_SIZE + 4, HEADER_SIZE + 8), struct.pack("<i", -1)),
            "length",
        ),
        # Sequence 1's byte pointer (after the 4 lengths) sent far past the end of .bin.
        (
            lambda idx: idx.__setitem__(
                slice(HEADER_SIZE + 16 + 8, HEADER_SIZE + 16 + 16), struct.pack("<q", 10**9)
            ),
            "places sequence 1 at bytes 1000000000-1000000002 of data.bin",
        ),
    ],
)
def test_corrupt_index_is_reported(tmp_path, corrupt, message):
    prefix = tmp_path / "data"
    index = _write_good(prefix)
    corrupt(index)
    (tmp_path / "data.idx").write_bytes(bytes(index))
    with pytest.raises(IndexedDatasetError, match=message) as error:
        IndexedDataset(prefix)
    assert "data.idx" in str(error.value)


def test_truncated_bin_and_missing_files_are_reported(tmp_path):
    prefix = tmp_path / "data"
    _write_good(prefix)
    data = (tmp_path / "data.bin").read_bytes()
    (tmp_path / "data.bin").write_bytes(data[:-2])
    with pytest.raises(IndexedDatasetError, match="data.bin is .* bytes but"):
        IndexedDataset(prefix)
    (tmp_path / "data.bin").unlink()
    with pytest.raises(IndexedDatasetError, match="data.bin not found.*preprocess"):
        IndexedDataset(prefix)


def test_an_index_of_no_sequences_with_an_empty_bin_opens(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "none.bin"), dtype=np.uint16)
    builder.finalize(str(tmp_path / "none.idx"))  # megatron-core writes this pair for an empty corpus
    assert len(IndexedDataset(tmp_path / "none")) == 0
