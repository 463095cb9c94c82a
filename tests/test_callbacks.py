"""Throughput and memory callbacks against a hand calculation of the recipe's figures, on a fake clock.

The recipe: 8 NPUs at TP8, global batch 32 of 32768 tokens, 46.7 s/step -> 2806 tokens/s/p.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mistral_lightning.callbacks import (
    MemoryMonitor,
    RecipeThroughputMonitor,
    format_summary,
    lookup_peak_tflops,
)
from mistral_lightning.callbacks import throughput as throughput_module
from mistral_lightning.config import MistralConfig

STEP_SECONDS = 46.7
SEQ = 32768
GLOBAL_BATCH = 32
# Mistral-7B by hand: per layer q,k,v,o = 4096*128*(32+8+8+32), MLP = 3*4096*14336, two norms of 4096;
# plus the LM head and the final norm (the embedding is a lookup, not counted).
NON_EMBEDDING = 32 * (4096 * 128 * 80 + 3 * 4096 * 14336 + 2 * 4096) + 32000 * 4096 + 4096
FLOPS_PER_TOKEN = 6 * NON_EMBEDDING + 12 * 32 * 4096 * 4096  # window 4096 < seq: 4096 attended keys


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(
    monkeypatch,
    world_size: int,
    replicas: int,
    steps: int,
    peak_tflops: float | None = 295.0,
    context: int = 1,
):
    """Drive the callback as Lightning would: per optimizer step, each replica accumulates micro-batches."""
    clock = FakeClock()
    monkeypatch.setattr(throughput_module, "perf_counter", clock)
    strategy = SimpleNamespace(
        distributed_sampler_kwargs={"num_replicas": replicas, "rank": 0},
        root_device=torch.device("cpu"),
        # Every rank counts the same tokens here, so their sum is world_size times this rank's.
        reduce=lambda tensor, reduce_op: tensor * world_size,
        context_parallel_layout=(context, 0),
    )
    trainer = SimpleNamespace(world_size=world_size, global_step=0, strategy=strategy, is_global_zero=True)
    logged: list[dict] = []
    pl_module = SimpleNamespace(
        config=MistralConfig.from_name("mistral-7b-32k"), model_name="Mistral-7B 32K", log_dict=logged.append
    )
    monitor = RecipeThroughputMonitor(window_size=3, peak_tflops=peak_tflops)
    monitor.on_train_start(trainer, pl_module)
    micro_batches = GLOBAL_BATCH // replicas  # micro-batch size 1 on each replica
    batch = {"input_ids": torch.zeros(1, SEQ // context, dtype=torch.long)}  # this rank's shard
    for _ in range(steps):
        for micro in range(micro_batches):
            if micro == micro_batches - 1:  # the optimizer step happens with the last micro-batch
                clock.now += STEP_SECONDS
                trainer.global_step += 1
            monitor.on_train_batch_end(trainer, pl_module, None, batch, micro)
    monitor.on_train_end(trainer, pl_module)
    return monitor, logged


@pytest.mark.parametrize(
    ("world_size", "replicas", "context"),
    [(8, 1, 1), (8, 2, 1), (1, 1, 1), (8, 1, 2), (8, 2, 4)],
    ids=["tp8", "tp4_dp2", "single", "tp4_cp2", "dp2_cp4"],
)
def test_recipe_figures_by_hand(monkeypatch, world_size, replicas, context):
    monitor, logged = _run(monkeypatch, world_size, replicas, steps=4, context=context)
    tokens_per_sec_per_device = GLOBAL_BATCH * SEQ / STEP_SECONDS / world_size
    tflops_per_device = FLOPS_PER_TOKEN * tokens_per_sec_per_device / 1e12
    expected = {
        "throughput/s_per_step": STEP_SECONDS,
        "throughput/samples_per_sec": GLOBAL_BATCH / STEP_SECONDS,
        "throughput/tokens_per_sec_per_device": tokens_per_sec_per_device,
        "throughput/tflops_per_device": tflops_per_device,
        "throughput/mfu": tflops_per_device / 295.0,
    }
    assert len(logged) == 3  # from the second step on (steps 2, 3 and 4), before the window of 3 is full
    assert all(values == pytest.approx(expected, rel=1e-9) for values in logged)
    if world_size == 8:
        assert logged[-1]["throughput/tokens_per_sec_per_device"] == pytest.approx(2806.6, abs=0.1)
    summary = monitor.summary  # from the end of step 1 to the end of step 4
    assert summary["iterations"] == 4 and summary["device"] == f"{world_size} x CPU"
    assert summary["tokens_per_sec_per_device"] == pytest.approx(tokens_per_sec_per_device, rel=1e-9)
    assert summary["s_per_step"] == pytest.approx(STEP_SECONDS, rel=1e-9)


def test_summary_row_in_the_recipes_format(monkeypatch):
    monitor, _ = _run(monkeypatch, 8, 1, steps=2, peak_tflops=None)
    assert "mfu" not in monitor.summary  # no peak for a CPU unless configured
    row = format_summary(monitor.summary, memory_bytes=44642 * 2**20).splitlines()
    assert row[0] == "| Device | Model | Iterations | samples/s | tokens/s/p | s/step | memory/p |"
    assert row[2] == "| 8 x CPU | Mistral-7B 32K | 2 | 0.685 | 2807 | 46.7 | ~44642MiB |"


def test_a_single_step_has_no_rates(monkeypatch):
    monitor, _ = _run(monkeypatch, 1, 1, steps=1)
    assert (
        format_summary(monitor.summary, None).splitlines()[2]
        == "| 1 x CPU | Mistral-7B 32K | 1 | n/a | n/a | n/a | n/a |"
    )


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("Ascend910B1", 374.0),
        ("Ascend910B2C", 354.0),
        ("Ascend910B3", 295.0),
        ("Ascend910B4", 246.0),
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Intel Xeon", None),
    ],
)
def test_peak_table_matches_device_names(name, peak):
    assert lookup_peak_tflops(name) == peak


def test_memory_monitor_reports_the_largest_peak_over_ranks():
    reduced = []

    def reduce(tensor, reduce_op):
        reduced.append(reduce_op)
        return tensor * 2  # as if another rank had twice the peak

    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce))
    monitor = MemoryMonitor()
    monitor.on_train_end(trainer, None)
    assert reduced == ["max"]
    assert monitor.peak_memory_bytes > 2 * 10 * 2**20  # twice this process's RSS, itself well above 10 MB
