"""Logging as Lightning users expect: throughput from the second step, padding left out of tokens/s, memory
in MiB, and the end-of-fit summary row in every logger (CSV, an MLflow file store, W&B offline).

The references: hand calculations on a fake clock; for the real run, the token count of the data as this
test wrote it, this process's peak RSS from `resource`, and each logger's files read back by its own library.
"""

from __future__ import annotations

import csv
import json
import resource
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.configs import tiny_fit_config, write_config

from mistral_lightning.callbacks import RecipeThroughputMonitor
from mistral_lightning.callbacks import throughput as throughput_module
from mistral_lightning.config import MistralConfig

STEP_SECONDS = 2.0


def _tokens_and_keys(batch: dict[str, torch.Tensor]) -> list[int]:
    """Real tokens, and tokens x attended keys (the tiny preset's window 64 exceeds every width here)."""
    tokens = (
        int((batch["document_ids"] >= 0).sum()) if "document_ids" in batch else batch["input_ids"].numel()
    )
    return [tokens, tokens * batch["input_ids"].shape[1]]


def _drive(
    monkeypatch, batches_per_replica: list[list[dict]], world_size: int = 1
) -> tuple[list[dict], dict]:
    """RecipeThroughputMonitor on rank 0 of `len(batches_per_replica)` replicas, one micro-batch per step each;
    the fake all-reduce sums what every rank would contribute (each replica has world/replicas ranks)."""
    now = [0.0]
    monkeypatch.setattr(throughput_module, "perf_counter", lambda: now[0])
    replicas = len(batches_per_replica)
    trainer = SimpleNamespace(world_size=world_size, global_step=0, is_global_zero=True)

    def reduce(tensor, reduce_op):
        step = [replica[trainer.global_step - 1] for replica in batches_per_replica]
        assert reduce_op == "sum" and tensor.tolist() == _tokens_and_keys(step[0])
        summed = [sum(column) for column in zip(*(_tokens_and_keys(batch) for batch in step))]
        return torch.tensor(summed) * (world_size // replicas)

    trainer.strategy = SimpleNamespace(
        distributed_sampler_kwargs={"num_replicas": replicas, "rank": 0},
        root_device=torch.device("cpu"),
        reduce=reduce,
    )
    logged: list[dict] = []
    pl_module = SimpleNamespace(
        config=MistralConfig.from_name("tiny"), model_name="tiny", log_dict=logged.append
    )
    monitor = RecipeThroughputMonitor(window_size=10)
    monitor.on_train_start(trainer, pl_module)
    for batch in batches_per_replica[0]:
        now[0] += STEP_SECONDS
        trainer.global_step += 1
        monitor.on_train_batch_end(trainer, pl_module, None, batch, 0)
    monitor.on_train_end(trainer, pl_module)
    return logged, monitor.summary


def _padded_batch(lengths: list[int], width: int) -> dict[str, torch.Tensor]:
    """Rows of `lengths` real tokens right-padded to `width`, as pad_collate pads instruction data."""
    document_ids = torch.full((len(lengths), width), -1)
    for row, length in enumerate(lengths):
        document_ids[row, :length] = 0
    return {"input_ids": torch.zeros(len(lengths), width, dtype=torch.long), "document_ids": document_ids}


def test_throughput_is_logged_from_the_second_step_before_the_window_fills(monkeypatch):
    batch = {"input_ids": torch.zeros(2, 32, dtype=torch.long)}
    logged, _ = _drive(monkeypatch, [[batch] * 3])
    # window_size=10, 3 steps: rates after steps 2 and 3, each over the steps so far.
    assert len(logged) == 2
    for values in logged:
        assert values["throughput/tokens_per_sec_per_device"] == pytest.approx(2 * 32 / STEP_SECONDS)
        assert values["throughput/s_per_step"] == pytest.approx(STEP_SECONDS)


def test_padding_is_not_counted_as_tokens(monkeypatch):
    # 3 + 5 real tokens padded to 8 positions, twice: 8 tokens per step, not 16.
    batch = _padded_batch([3, 5], width=8)
    logged, summary = _drive(monkeypatch, [[batch] * 3])
    assert logged[-1]["throughput/tokens_per_sec_per_device"] == pytest.approx(8 / STEP_SECONDS)
    assert summary["tokens_per_sec_per_device"] == pytest.approx(8 / STEP_SECONDS)
    assert summary["samples_per_sec"] == pytest.approx(2 / STEP_SECONDS)


def test_replicas_with_different_padding_count_their_own_tokens(monkeypatch):
    # DP2 x TP2 on 4 devices: replica 0 has 8 real tokens per step, replica 1 has 14 (7 + 7).
    ours, theirs = _padded_batch([3, 5], width=8), _padded_batch([7, 7], width=8)
    logged, summary = _drive(monkeypatch, [[ours] * 3, [theirs] * 3], world_size=4)
    tokens_per_step = 8 + 14
    assert logged[-1]["throughput/tokens_per_sec_per_device"] == pytest.approx(
        tokens_per_step / STEP_SECONDS / 4
    )
    assert summary["samples_per_sec"] == pytest.approx(4 / STEP_SECONDS)
    # FLOPs by hand: 6 x non-embedding parameters per token, plus 12 x layers x width x 8 attended keys.
    config = MistralConfig.from_name("tiny")
    non_embedding = config.num_params - config.vocab_size * config.hidden_size
    flops_per_token = 6 * non_embedding + 12 * config.num_layers * config.num_heads * config.head_dim * 8
    assert summary["tflops_per_device"] == pytest.approx(
        tokens_per_step * flops_per_token / STEP_SECONDS / 4 / 1e12
    )


def _replica_summary(lengths_per_rank: list[list[int]]) -> dict:
    """On each of 2 gloo ranks (DP2): 3 steps of this rank's padded batch, counted through Lightning's own
    ModelParallelStrategy.reduce; returns the summary."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    rank = torch.distributed.get_rank()
    now = [0.0]
    throughput_module.perf_counter = lambda: now[0]
    strategy = SimpleNamespace(
        distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
        root_device=torch.device("cpu"),
        reduce=ModelParallelStrategy().reduce,
    )
    trainer = SimpleNamespace(world_size=2, global_step=0, strategy=strategy, is_global_zero=rank == 0)
    pl_module = SimpleNamespace(
        config=MistralConfig.from_name("tiny"), model_name="tiny", log_dict=lambda _: None
    )
    monitor = RecipeThroughputMonitor(window_size=10)
    monitor.on_train_start(trainer, pl_module)
    for _ in range(3):
        now[0] += STEP_SECONDS
        trainer.global_step += 1
        monitor.on_train_batch_end(trainer, pl_module, None, _padded_batch(lengths_per_rank[rank], 8), 0)
    monitor.on_train_end(trainer, pl_module)
    return monitor.summary


@pytest.mark.processes
def test_two_real_ranks_sum_their_tokens_through_lightnings_reduce():
    from helpers.processes import run_on_ranks

    summaries = run_on_ranks(_replica_summary, [[3, 5], [7, 7]])
    for summary in summaries:  # both ranks agree: (8 + 14) tokens per step over 2 devices
        assert summary["tokens_per_sec_per_device"] == pytest.approx((8 + 14) / STEP_SECONDS / 2)


# ---------------------------------------------------------------------- a real fit through the CLI
SAMPLE_TOKENS = 20  # every instruction sample: 19 shifted positions, padded to 24 (a multiple of 8)
STEPS = 3


def _fit_config(root: Path, data_prefix: str) -> Path:
    config = tiny_fit_config(
        root,
        data_prefix,
        seed_everything=1,
        trainer={
            "max_steps": STEPS,
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(root / "csv"), "name": "", "version": "run"},
                },
                {
                    "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                    "init_args": {"experiment_name": "tiny", "tracking_uri": f"file:{root / 'mlruns'}"},
                },
                {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"offline": True, "save_dir": str(root), "project": "tiny"},
                },
            ],
            "callbacks": [
                {
                    "class_path": "mistral_lightning.callbacks.RecipeThroughputMonitor",
                    "init_args": {"window_size": 10},
                },
                {"class_path": "mistral_lightning.callbacks.MemoryMonitor"},
            ],
        },
        data={
            "class_path": "mistral_lightning.data.datamodules.InstructionDataModule",
            "init_args": {
                "data_prefix": data_prefix,
                "seq_length": 32,
                "micro_batch_size": 2,
                "split": "1,0,0",
                "num_workers": 0,
            },
        },
    )
    return write_config(config, root / "fit.yaml")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A 3-step `mistral-lightning fit` with the CSV, MLflow and W&B loggers at once; W&B offline, no network."""
    import wandb
    from helpers.training import write_instruction_data

    from mistral_lightning.cli import main as cli_main

    root = tmp_path_factory.mktemp("logged")
    prefix = write_instruction_data(str(root / "sft"), [(8, SAMPLE_TOKENS - 8)] * 16)
    with pytest.MonkeyPatch.context() as env:
        # MLflow 3 keeps its file store behind this switch (its default is now a database).
        offline = {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true"}
        for name, value in {**offline, "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
            env.setenv(name, value)
        assert cli_main(["fit", "--config", str(_fit_config(root, prefix))]) == 0
        wandb.finish()
        wandb.teardown()  # stops W&B's service process, which writes the run's log to the end
    rows = list(csv.DictReader((root / "csv" / "run" / "metrics.csv").open()))
    return SimpleNamespace(
        root=root, rows=rows, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )


def _csv_summary(rows: list[dict]) -> dict[str, float]:
    return {
        key: float(value)
        for row in rows
        for key, value in row.items()
        if key.startswith("summary/") and value
    }


@pytest.mark.processes
def test_throughput_rows_start_at_the_second_step_of_a_real_run(logged_run):
    steps = [int(row["step"]) for row in logged_run.rows if row.get("throughput/tokens_per_sec_per_device")]
    assert len(steps) == STEPS - 1  # window_size 10 > 3 steps, yet steps 2 and 3 have rates


@pytest.mark.processes
def test_summary_row_reaches_every_logger_without_padding_and_in_mib(logged_run):
    summary = _csv_summary(logged_run.rows)
    assert summary["summary/iterations"] == STEPS
    # Tokens per sample = 19 real positions, not the 24 a padded batch holds.
    per_sample = summary["summary/tokens_per_sec_per_device"] / summary["summary/samples_per_sec"]
    assert per_sample == pytest.approx(SAMPLE_TOKENS - 1, rel=1e-9)
    # Peak RSS in MiB: at most this process's peak since, and well above the 100 MiB torch alone takes.
    assert 100 < summary["summary/peak_memory_mib"] <= logged_run.peak_rss_mib
    per_step = [
        float(row["memory/peak_rss_mib"]) for row in logged_run.rows if row.get("memory/peak_rss_mib")
    ]
    assert len(per_step) == STEPS and 100 < max(per_step) <= summary["summary/peak_memory_mib"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{logged_run.root / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("summary/")} == pytest.approx(summary)

    (wandb_run,) = (logged_run.root / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = _wandb_run_summary(wandb_run)
    assert {k: v for k, v in recorded.items() if k.startswith("summary/")} == pytest.approx(summary)


def _wandb_run_summary(path: Path) -> dict:
    """The run summary W&B would show, from an offline run's transaction log: LevelDB-log blocks of 32 KiB
    after a 7-byte `:W&B` header; each record has a 7-byte header (crc, length, type: 1 full, 2 first,
    3 middle, 4 last) and holds a `wandb_internal_pb2.Record`, parsed by W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending, summary, kinds = 7, b"", {}, []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or kind == 0:  # the rest of a block is padding
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            kinds.append(record.WhichOneof("record_type"))
            if kinds[-1] == "summary":
                summary |= {
                    "/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update
                }
    assert kinds[-1] == "exit", "the run's log ends before its exit record"
    return summary
