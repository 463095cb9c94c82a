"""Pretraining and instruction DataModules: batch contract, splits, caching, blending and exact resume."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from helpers.training import fake_trainer
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)

from mistral_lightning.data.datamodules import InstructionDataModule, PretrainDataModule
from mistral_lightning.data.datasets import BlendedDataset, GPTPackedDataset, parse_split, split_bounds
from mistral_lightning.data.indexed import IndexedDatasetWriter

SEQ = 16


def _write_documents(prefix, lengths):
    """Token = 100 * document + position, so every token says where it came from."""
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document, length in enumerate(lengths):
            writer.add_document(100 * document + np.arange(length))
        writer.finalize()
    return str(prefix)


@pytest.fixture
def text_prefix(tmp_path):
    lengths = np.random.default_rng(0).integers(1, 40, size=40)
    return _write_documents(tmp_path / "corpus_text_document", lengths), lengths


def _ready(datamodule, replicas=1, rank=0):
    datamodule.trainer = fake_trainer(replicas, rank)
    datamodule.setup("fit")
    return datamodule


def test_gpt_samples_are_shifted_windows_with_document_boundaries(text_prefix):
    prefix, lengths = text_prefix
    datamodule = _ready(PretrainDataModule([prefix], seq_length=SEQ, split="8,1,1", num_workers=0))
    train = datamodule.datasets["train"]
    train_documents = range(*split_bounds(len(lengths), parse_split("8,1,1"))[:2])
    assert len(train) == (int(lengths[train_documents.start : train_documents.stop].sum()) - 1) // SEQ
    for index in range(len(train)):
        item = train[index]
        tokens, labels = item["input_ids"].numpy(), item["labels"].numpy()
        document, position = tokens // 100, tokens % 100
        assert all(v.shape == (SEQ,) and v.dtype == torch.int64 for v in item.values())
        assert (item["document_ids"].numpy()[1:] != item["document_ids"].numpy()[:-1]).tolist() == (
            document[1:] != document[:-1]
        ).tolist()
        runs = np.split(np.arange(SEQ), np.flatnonzero(np.diff(document)) + 1)
        for run_index, run in enumerate(runs):
            assert item["position_ids"].numpy()[run].tolist() == list(range(len(run)))
            assert (np.diff(position[run]) == 1).all()
            assert run_index == 0 or position[run[0]] == 0  # later documents start at their beginning
            if run_index < len(runs) - 1:  # and earlier ones are read to their end
                assert position[run[-1]] == lengths[document[run[-1]]] - 1
                assert labels[run[-1]] == -100
            assert (labels[run[:-1]] == tokens[run[:-1]] + 1).all()
        assert labels[-1] in (-100, tokens[-1] + 1)


def test_cross_document_attention_keeps_plain_gpt_samples(text_prefix):
    prefix, _ = text_prefix
    datamodule = _ready(
        PretrainDataModule([prefix], seq_length=SEQ, split="1", cross_document_attention=True, num_workers=0)
    )
    item = datamodule.datasets["train"][0]
    assert set(item) == {"input_ids", "labels", "position_ids"}
    assert item["position_ids"].tolist() == list(range(SEQ))
    assert item["labels"][:-1].tolist() == item["input_ids"][1:].tolist()


@pytest.mark.parametrize("split", ["969,30,1", "8,1,1", "1", "100,0,0", "2,3"])
@pytest.mark.parametrize("size", [10, 999, 12345])
def test_split_bounds_match_megatron_core(split, size):
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    ours = split_bounds(size, parse_split(split))
    for index, bookends in enumerate(matrix):
        if bookends is None:  # megatron-core's mark for an empty split
            assert ours[index] == ours[index + 1]
        else:
            assert (ours[index], ours[index + 1]) == tuple(int(round(b * size)) for b in bookends)


def test_indices_are_cached_next_to_data_and_deterministic(text_prefix, tmp_path, monkeypatch):
    prefix, _ = text_prefix

    def samples(seed):
        dataset = _ready(PretrainDataModule([prefix], seq_length=SEQ, split="1", seed=seed)).datasets["train"]
        return [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]

    first = samples(seed=7)
    cached = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "index-cache").glob("*.npy"))
    assert cached == ["doc_idx.npy", "sample_idx.npy", "shuffle_idx.npy"]

    def no_rebuild(*args):
        raise AssertionError("indices were rebuilt instead of loaded from the cache")

    monkeypatch.setattr(GPTPackedDataset, "_build_indices", no_rebuild)
    assert samples(seed=7) == first
    monkeypatch.undo()
    assert samples(seed=8) != first


def test_blend_interleaves_in_proportion(tmp_path):
    small = _write_documents(tmp_path / "a_text_document", [33] * 10)
    large = _write_documents(tmp_path / "b_text_document", [33] * 30)
    datamodule = _ready(
        PretrainDataModule([small, large], blend_weights=[3.0, 1.0], seq_length=SEQ, split="1")
    )
    blend = datamodule.datasets["train"]
    assert isinstance(blend, BlendedDataset)
    first_count = np.cumsum(blend.dataset_index == 0)
    steps = np.arange(1, len(blend) + 1)
    assert np.all(np.abs(first_count - 0.75 * steps) <= 1)
    assert blend[0]["input_ids"][0] // 100 < 10  # the first sample comes from the heavier, smaller dataset


def _consume(datamodule, steps):
    """Batches a Lightning fit loop would see over `steps` steps, re-iterating the loader at each epoch end."""
    loader, seen = datamodule.train_dataloader(), []
    while len(seen) < steps:
        for batch in loader:
            seen.append(datamodule.on_after_batch_transfer(batch, 0)["input_ids"])
            if len(seen) == steps:
                break
    return seen


def _whole_corpus(prefix: str) -> PretrainDataModule:
    """The resume tests' data: the whole corpus for training, micro-batches of 2."""
    return PretrainDataModule([prefix], seq_length=SEQ, micro_batch_size=2, split="1", num_workers=0)


@pytest.mark.parametrize("replicas", [1, 2])
def test_resume_from_consumed_samples_equals_uninterrupted_run(text_prefix, replicas):
    prefix, _ = text_prefix
    steps, stop = 25, 9  # several epochs, interrupted mid-epoch
    uninterrupted, resumed = [], []
    for rank in range(replicas):
        uninterrupted.append(_consume(_ready(_whole_corpus(prefix), replicas, rank), steps))
        first_half = _ready(_whole_corpus(prefix), replicas, rank)
        _consume(first_half, stop)
        restarted = _whole_corpus(prefix)
        restarted.load_state_dict(first_half.state_dict())
        resumed.append(_consume(_ready(restarted, replicas, rank), steps - stop))
    for rank in range(replicas):
        assert all(torch.equal(a, b) for a, b in zip(uninterrupted[rank][stop:], resumed[rank]))
    assert first_half.state_dict() == {"consumed_samples": stop * 2 * replicas}
    if replicas == 2:  # the two ranks split each global batch
        for step in range(steps):
            rows = [tuple(r.tolist()) for rank in range(2) for r in uninterrupted[rank][step]]
            assert len(set(rows)) == 4


class _RecordingModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_index):
        self.seen.append(batch["input_ids"].clone())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_checkpoint_resumes_the_data_position(text_prefix, tmp_path):
    prefix, _ = text_prefix
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    full = _RecordingModule()
    L.Trainer(max_steps=12, **options).fit(full, _whole_corpus(prefix))
    first = _RecordingModule()
    trainer = L.Trainer(max_steps=5, **options)
    trainer.fit(first, _whole_corpus(prefix))
    trainer.save_checkpoint(tmp_path / "step5.ckpt")
    second = _RecordingModule()
    L.Trainer(max_steps=12, **options).fit(second, _whole_corpus(prefix), ckpt_path=tmp_path / "step5.ckpt")
    assert len(full.seen) == 12 and len(second.seen) == 7
    assert all(torch.equal(a, b) for a, b in zip(full.seen[5:], second.seen))


def _write_instruction_data(tmp_path, lengths, prompt_lengths):
    """Sample k: tokens 1000k+1, 1000k+2, ...; the first prompt_lengths[k] labels are -100."""
    prefix = tmp_path / "sft"
    with (
        IndexedDatasetWriter(f"{prefix}_packed_input_ids_document", np.uint16) as ids,
        IndexedDatasetWriter(f"{prefix}_packed_labels_document", np.int32) as labels,
    ):
        for k, (length, prompt) in enumerate(zip(lengths, prompt_lengths)):
            tokens = 1000 * k + 1 + np.arange(length)
            ids.add_document(tokens)
            labels.add_document(np.where(np.arange(length) < prompt, -100, tokens))
        ids.finalize()
        labels.finalize()
    return str(prefix)


def _expected_shifted(tokens_in_row, prompt_lengths):
    """Hand-built labels: the stored label of the next token of the same sample (-100 in the prompt)."""
    sample, position = tokens_in_row // 1000, tokens_in_row % 1000 - 1
    return [
        (-100 if p + 1 < prompt_lengths[k] else t + 1) for t, k, p in zip(tokens_in_row, sample, position)
    ]


@pytest.fixture
def instruction_data(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 30, size=30)
    prompt_lengths = np.minimum(rng.integers(1, 10, size=30), lengths - 1)
    return _write_instruction_data(tmp_path, lengths, prompt_lengths), lengths, prompt_lengths


# Samples are up to 29 tokens: SEQ caps them; at 32, padding to 10 gives other widths than to 8, and 32 one width.
@pytest.mark.parametrize(("seq_length", "multiple"), [(SEQ, 8), (32, 10), (32, 32)])
def test_instruction_batches_are_padded_shifted_and_capped(instruction_data, seq_length, multiple):
    prefix, lengths, prompt_lengths = instruction_data
    datamodule = _ready(
        InstructionDataModule(
            prefix, seq_length, micro_batch_size=3, split="1", pad_to_multiple_of=multiple, num_workers=0
        )
    )
    for batch in datamodule.train_dataloader():
        real = [min(lengths[int(row[0]) // 1000] - 1, seq_length) for row in batch["input_ids"]]
        assert batch["input_ids"].shape == (3, min(math.ceil(max(real) / multiple) * multiple, seq_length))
        for row, size in enumerate(real):
            tokens = batch["input_ids"][row, :size].numpy()
            assert (np.diff(tokens) == 1).all() and tokens[0] % 1000 == 1
            assert batch["labels"][row, :size].tolist() == _expected_shifted(tokens, prompt_lengths)
            assert batch["position_ids"][row, :size].tolist() == list(range(size))
            assert batch["document_ids"][row, :size].tolist() == [0] * size
            assert (batch["labels"][row, size:] == -100).all() and (
                batch["document_ids"][row, size:] == -1
            ).all()
            assert (batch["input_ids"][row, size:] == 0).all()


def test_instruction_packing_keeps_samples_apart(instruction_data):
    prefix, lengths, prompt_lengths = instruction_data
    datamodule = _ready(InstructionDataModule(prefix, seq_length=SEQ, split="1", pack=True, num_workers=0))
    dataset, seen = datamodule.datasets["train"], []
    assert len(dataset) < len(lengths)
    for index in range(len(dataset)):
        item = {key: value.numpy() for key, value in dataset[index].items()}
        assert len(item["input_ids"]) <= SEQ
        samples = item["input_ids"] // 1000
        assert (np.diff(item["document_ids"]) == (np.diff(samples) != 0)).all()
        for k in np.unique(samples):
            where = samples == k
            assert item["position_ids"][where].tolist() == list(range(int(where.sum())))
        assert item["labels"].tolist() == _expected_shifted(item["input_ids"], prompt_lengths)
        seen += list(dict.fromkeys(samples.tolist()))
    assert sorted(seen) == list(range(len(lengths)))


def test_a_data_prefix_under_the_home_folder_may_be_written_with_a_tilde(text_prefix, tmp_path, monkeypatch):
    """In a YAML config the shell never sees `~`; the DataModules expand it as every path option does."""
    monkeypatch.setenv("HOME", str(tmp_path))
    prefix = "~/corpus_text_document"
    datamodule = _ready(PretrainDataModule(data_prefixes=[prefix], seq_length=SEQ, micro_batch_size=2))
    assert datamodule.data_prefixes == [text_prefix[0]]
    assert len(datamodule.datasets["train"]) > 0
