"""What the LightningModule and the DataModules read from each other, through the Trainer that holds both.

The module reads the data's `seq_length` (sequence parallelism checks it divides before any weight is
built) and, for `activation_checkpointing: auto`, its `micro_batch_size`; a DataModule reads the model's
`vocab_size` (token ids beyond it are refused before the first step) and its `sliding_window` (which decides
how context parallelism splits a sequence). A preference objective (DPO)
reads whether the data's rows hold preference pairs (`preference_pairs`).
Either side may run without the other (a module fitted on plain DataLoaders, a DataModule set up alone).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class SequenceData(Protocol):
    """A DataModule whose batches are at most `seq_length` positions long."""

    seq_length: int


@runtime_checkable
class BatchShapeData(Protocol):
    """A DataModule whose batches hold `micro_batch_size` rows of at most `seq_length` positions."""

    micro_batch_size: int
    seq_length: int


@runtime_checkable
class FixedWidthData(Protocol):
    """A DataModule that says whether every batch is exactly `seq_length` positions wide (then a compiled block
    compiles once; each new width compiles it again)."""

    fixed_width: bool


@runtime_checkable
class PreferencePairData(Protocol):
    """A DataModule that says whether its rows hold preference pairs.

    When `preference_pairs` is True, in every row of a batch document 2k (its `document_ids`) is the chosen
    answer of the row's k-th pair and document 2k + 1 the rejected answer to the same prompt: each side whole
    (prompt and answer), labelled on the answer only; padding is document -1. So a pair never spans rows,
    micro-batches or data-parallel ranks (DPO refuses context parallelism, which would cut a row).
    """

    preference_pairs: bool


@runtime_checkable
class VocabularyModel(Protocol):
    """A LightningModule whose model embeds token ids below `vocab_size`."""

    @property
    def vocab_size(self) -> int: ...


@runtime_checkable
class AttentionWindowModel(Protocol):
    """A LightningModule whose attention sees the last `sliding_window` positions (None: every earlier one)."""

    @property
    def sliding_window(self) -> int | None: ...


def data_seq_length(trainer: Any) -> int | None:
    """The trainer's DataModule's sequence length, or None without one."""
    datamodule = None if trainer is None else trainer.datamodule
    return datamodule.seq_length if isinstance(datamodule, SequenceData) else None


def data_batch_shape(trainer: Any) -> tuple[int | None, int | None]:
    """(micro_batch_size, seq_length) of the trainer's DataModule, None where it does not say."""
    datamodule = None if trainer is None else trainer.datamodule
    if isinstance(datamodule, BatchShapeData):
        return datamodule.micro_batch_size, datamodule.seq_length
    return None, data_seq_length(trainer)


def data_fixed_width(trainer: Any) -> bool | None:
    """Whether the trainer's DataModule's batches all have one width; None without one that says."""
    datamodule = None if trainer is None else trainer.datamodule
    return datamodule.fixed_width if isinstance(datamodule, FixedWidthData) else None


def data_holds_preference_pairs(trainer: Any) -> bool | None:
    """Whether the trainer's DataModule's rows hold preference pairs; None without one that says."""
    datamodule = None if trainer is None else trainer.datamodule
    return datamodule.preference_pairs if isinstance(datamodule, PreferencePairData) else None


def model_vocab_size(trainer: Any) -> int | None:
    """The trainer's LightningModule's vocabulary size, or None without one."""
    module = None if trainer is None else trainer.lightning_module
    return module.vocab_size if isinstance(module, VocabularyModel) else None


def model_sliding_window(trainer: Any) -> int | None:
    """The trainer's LightningModule's attention window; None for a windowless one, or without one."""
    module = None if trainer is None else trainer.lightning_module
    return module.sliding_window if isinstance(module, AttentionWindowModel) else None
