"""Shared pieces of the training tests: toy indexed data, a Trainer factory, a recorder, a process launcher.

The session fixtures built from them (toy_data, reference, killed_checkpoint, ...) are in conftest.py.

Multi-process runs start `train_worker.py` once per rank with the environment torchrun would set
(Lightning sees LOCAL_RANK and joins them over gloo); each launch runs several scenarios in turn,
because every launch pays the import time of torch and Lightning again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from helpers.processes import start_ranks
from mistral_lightning.data.datamodules import InstructionDataModule, PreferenceDataModule, PretrainDataModule
from mistral_lightning.data.indexed import IndexedDatasetWriter
from mistral_lightning.training.module import MistralLightningModule
from mistral_lightning.training.optim import OptimizerConfig, ScheduleConfig
from mistral_lightning.training.strategy import DeviceModelParallelStrategy

GLOBAL_BATCH = 2
SEQ_LENGTH = 32
STEPS = 6
WORKER = Path(__file__).with_name("train_worker.py")


def write_toy_pretrain_data(folder: Path) -> str:
    """Random documents of 20-60 tokens as a Megatron `<prefix>_text_document` dataset."""
    prefix = str(folder / "toy_text_document")
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for _ in range(200):
        writer.add_document(rng.integers(3, 2000, size=int(rng.integers(20, 60))))
    writer.finalize()
    return prefix


def fake_trainer(replicas: int = 1, rank: int = 0, vocab_size: int | None = None) -> SimpleNamespace:
    """The Trainer attributes a DataModule reads (data/contract.py and the sampler layout), in a fit run."""
    return SimpleNamespace(
        training=True,
        state=SimpleNamespace(fn="fit"),
        strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank}),
        datamodule=None,
        lightning_module=None if vocab_size is None else SimpleNamespace(vocab_size=vocab_size),
    )


def datamodule(
    prefix: str,
    data_parallel: int = 1,
    seq_length: int = SEQ_LENGTH,
    *,
    global_batch: int = GLOBAL_BATCH,
    accumulate: int = 1,
    instruction: bool = False,
    preference: bool = False,
) -> PretrainDataModule | InstructionDataModule | PreferenceDataModule:
    """Pretraining data (every label valid), `instruction` data written by `write_instruction_data`, or
    `preference` pairs written by `write_preference_data` (packed into rows); `global_batch` samples (rows) per
    optimizer step, split over the data-parallel ranks and accumulated micro-batches."""
    micro_batch_size = global_batch // (data_parallel * accumulate)
    if preference:
        return PreferenceDataModule(
            prefix,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            split="1,0,0",
            num_workers=0,
            pack=True,
        )
    if instruction:
        return InstructionDataModule(
            prefix, seq_length=seq_length, micro_batch_size=micro_batch_size, split="1,0,0", num_workers=0
        )
    return PretrainDataModule(
        [prefix],
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        split="1,0,0",
        num_workers=0,
        cross_document_attention=True,
    )


def write_instruction_data(prefix: str, samples: list[tuple[int, int]], seed: int = 0) -> str:
    """Random `(prompt tokens, response tokens)` samples as `<prefix>_packed_{input_ids,labels}_document`,
    labels -100 on the prompt, as preprocess writes them."""
    rng = np.random.default_rng(seed)
    ids_writer = IndexedDatasetWriter(f"{prefix}_packed_input_ids_document", np.int32)
    labels_writer = IndexedDatasetWriter(f"{prefix}_packed_labels_document", np.int32)
    for prompt, response in samples:
        ids = np.concatenate([[1], rng.integers(3, 2000, size=prompt + response - 1)])
        ids_writer.add_document(ids)
        labels_writer.add_document(np.where(np.arange(len(ids)) < prompt, -100, ids))
    ids_writer.finalize()
    labels_writer.finalize()
    return prefix


def write_preference_data(prefix: str, pairs: list[tuple[int, int, int]], seed: int = 0) -> str:
    """Random `(prompt, chosen, rejected)` token counts as `<prefix>_packed_{chosen,rejected}_{input_ids,labels}
    _document`, one shared prompt per pair, labels -100 on it, as `preprocess --handler preference` writes them."""
    rng = np.random.default_rng(seed)
    writers = {
        (side, key): IndexedDatasetWriter(f"{prefix}_packed_{side}_{key}_document", np.int32)
        for side in ("chosen", "rejected")
        for key in ("input_ids", "labels")
    }
    for prompt, *answers in pairs:
        prompt_ids = np.concatenate([[1], rng.integers(3, 2000, size=prompt - 1)])
        for side, length in zip(("chosen", "rejected"), answers):
            ids = np.concatenate([prompt_ids, rng.integers(3, 2000, size=length)])
            writers[side, "input_ids"].add_document(ids)
            writers[side, "labels"].add_document(np.where(np.arange(len(ids)) < prompt, -100, ids))
    for writer in writers.values():
        writer.finalize()
    return prefix


class StepCounter(L.Callback):
    """How many training steps started: a run refused before its first step counts 0."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


class Recorder(L.Callback):
    """Per optimizer step, the logged loss and gradient norm; per micro-batch, a fingerprint of the batch
    (and, with `keep_batches`, the batch itself)."""

    def __init__(self, keep_batches: bool = False) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.batches: list[int] = []
        self.kept: list[dict[str, torch.Tensor]] = []
        self.keep_batches = keep_batches
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weights = torch.arange(1, batch["input_ids"].numel() + 1).view_as(batch["input_ids"])
        self.batches.append(int((batch["input_ids"] * weights).sum()))
        if self.keep_batches:
            self.kept.append({key: value.clone() for key, value in batch.items()})
        if trainer.global_step != self._step:  # an optimizer step ended with this micro-batch
            self._step = trainer.global_step
            self.losses.append(float(trainer.callback_metrics["train/loss"]))
            self.grad_norms.append(float(trainer.callback_metrics.get("train/grad_norm", float("nan"))))


def trainer(
    root: Path,
    *,
    tensor_parallel: int = 1,
    data_parallel: int = 1,
    context_parallel: int = 1,
    max_steps: int = STEPS,
    accumulate: int = 1,
    callbacks: list[L.Callback] = (),
    checkpoint_every: int | None = None,
    distributed_checkpoint: bool = True,
    **settings,
) -> L.Trainer:
    """A CPU trainer of the given layout; `settings` override or add `L.Trainer` arguments."""
    if checkpoint_every:
        callbacks = [
            *callbacks,
            ModelCheckpoint(
                dirpath=root / "checkpoints",
                filename="{step}",
                every_n_train_steps=checkpoint_every,
                save_top_k=-1,
            ),
        ]
    defaults = dict(
        accelerator="cpu",
        devices=tensor_parallel * data_parallel * context_parallel,
        strategy=DeviceModelParallelStrategy(
            data_parallel_size=data_parallel,
            tensor_parallel_size=tensor_parallel,
            context_parallel_size=context_parallel,
            save_distributed_checkpoint=distributed_checkpoint,
        )
        if context_parallel > 1
        else ModelParallelStrategy(
            data_parallel_size=data_parallel,
            tensor_parallel_size=tensor_parallel,
            save_distributed_checkpoint=distributed_checkpoint,
        ),
        precision="32-true",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=bool(checkpoint_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**(defaults | settings))


def module(**overrides) -> MistralLightningModule:
    settings = dict(
        model_config="tiny",
        optimizer=OptimizerConfig(lr=1e-3),
        schedule=ScheduleConfig(warmup_fraction=0.2, min_lr=1e-4),
        init_seed=3,
    )
    return MistralLightningModule(**{**settings, **overrides})


def launch(
    scenarios: list[dict], folder: Path, nprocs: int, timeout: float = 300
) -> tuple[list[int], dict | None, str]:
    """Run `train_worker.py` on `nprocs` ranks; returns their exit codes, rank 0's results and output."""
    spec, results = folder / "spec.json", folder / "results.json"
    spec.write_text(json.dumps({"scenarios": scenarios, "results": str(results)}))
    procs = start_ranks(
        [sys.executable, str(WORKER), str(spec)],
        nprocs,
        folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    codes = [proc.returncode for proc in procs]
    return codes, json.loads(results.read_text()) if results.is_file() else None, outputs[0][-6000:]
