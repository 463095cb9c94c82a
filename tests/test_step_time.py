"""The plan's step-time prediction: what it counts in the simulated step, the calibration tables it reads, and the
per-block checkpointing mixes it compares.

The FLOPs the fake step counts equal torch's own FlopCounterMode over a real step of the same model (forward,
backward and AdamW, with the two micro-batches the simulation runs scaled to the step's four), the CPU's fused
attention kernels given the formulas of the flash ones, which torch's table names instead. The predicted
time against a real `fit` is a benchmark, not a test (benchmarks/results/plan_step_time.md): tests never assert
timings.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import mistral_lightning.training.device_rates as device_rates
from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.cli import main as cli_main
from mistral_lightning.errors import UserError
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.training.device_rates import device_table, load_table, rates_for
from mistral_lightning.training.memory_plan import StepShape, simulate_training_step
from mistral_lightning.training.optim import OptimizerConfig, build_optimizer
from mistral_lightning.training.parallel import apply_activation_checkpointing, layer_policies
from mistral_lightning.training.step_time import StepCost

CONFIG = MistralConfig.from_name("tiny", vocab_size=512, sliding_window=16)
SHAPE = StepShape(micro_batch_size=2, seq_length=48, micro_batches=4, loss_chunk_size=64)


def _model(policies="none") -> Mistral:
    model = Mistral(CONFIG)
    apply_activation_checkpointing(model, policies)
    return model


def _raw(formula):
    """A formula of torch's table, already taking the operator's own arguments, for FlopCounterMode's mapping."""

    def count(*args, **kwargs):
        return formula(*args, **kwargs)

    count._get_raw = True
    return count


def _meta_model(policies="none") -> Mistral:
    with torch.device("meta"):
        return _model(policies)


@pytest.mark.parametrize("policies", ["none", ["full", "none"]], ids=["none", "mixed"])
def test_simulated_step_counts_the_flops_torch_counts_in_a_real_step(policies):
    optimizer_config = OptimizerConfig()
    report = simulate_training_step(
        lambda: _meta_model(policies),
        lambda model: build_optimizer(model, optimizer_config),
        SHAPE,
        steps=1,
        lightning_order=False,
    )
    model = _model(policies)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, optimizer_config)
    size = (SHAPE.micro_batch_size, SHAPE.seq_length)
    ids = torch.randint(0, CONFIG.vocab_size, size, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SHAPE.seq_length).expand(size)
    # The plan prices the loss at its dearest labelling: every position but one (memory_plan.py).
    labels = ids.clone()
    labels[0, 0] = IGNORE_INDEX
    flash = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _raw(
            flop_registry[torch.ops.aten._scaled_dot_product_flash_attention]
        ),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw(
            flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_backward]
        ),
    }
    with FlopCounterMode(display=False, custom_mapping=flash) as counter:
        for _ in range(SHAPE.micro_batches):
            model.loss(ids, labels, positions, chunk_size=SHAPE.loss_chunk_size, reduction="sum").backward()
        optimizer.step()
    assert report.step_cost.matmul_flops == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert report.step_cost.matmul_flops > 0 and report.step_cost.operators > 0


def test_checkpointed_blocks_count_their_recomputation():
    cost = {}
    for policies in ("none", ["full", "none"], "full"):
        report = simulate_training_step(
            lambda policies=policies: _meta_model(policies),
            lambda model: build_optimizer(model, OptimizerConfig()),
            SHAPE,
            steps=1,
        )
        cost[str(policies)] = report.step_cost.matmul_flops
    # Each fully checkpointed block runs its forward pass again: the mix lies halfway between the two.
    assert cost["none"] < cost["['full', 'none']"] < cost["full"]
    assert cost["['full', 'none']"] - cost["none"] == pytest.approx(cost["full"] - cost["['full', 'none']"])


def test_rates_turn_each_band_into_seconds_by_hand():
    (rates,) = load_table("h100").values()
    rates = dataclasses.replace(
        rates, small_matmul_tflops=1.0, large_matmul_tflops=2.0, cache_gbps=10.0, llc_gbps=5.0, memory_gbps=1.0,
        operator_us=2.0, collective_gbps=4.0, collective_latency_us=100.0,
    )  # fmt: skip
    cost = StepCost(
        small_matmul_flops=1e12, large_matmul_flops=4e12, cache_bytes=1e10, llc_bytes=1e10, memory_bytes=1e9,
        operators=1e6, collective_bytes=8e9, collectives=1e4,
    )  # fmt: skip
    assert rates.seconds(cost) == pytest.approx(1 + 2 + 1 + 2 + 1 + 2 + 2 + 1)


def test_a_table_has_a_row_per_process_count_and_the_nearest_above_answers():
    table = load_table("cpu-2core")
    assert sorted(table) == [1, 2, 4]
    assert (
        rates_for(table, 3) is table[4]
        and rates_for(table, 8) is table[4]
        and rates_for(table, 1) is table[1]
    )


@pytest.mark.parametrize(
    ("accelerator", "card", "expected"),
    [
        ("cuda", "NVIDIA H200", "h200"),
        ("cuda", "NVIDIA H100 80GB HBM3", "h100"),
        ("cuda", "NVIDIA A100-SXM4-80GB", "h100"),  # no table of its own: the accelerator's usual one
        ("cpu", "CPU", "cpu-2core"),
        ("npu", "Ascend910B3", "flops only"),
    ],
)
def test_a_device_gets_the_table_its_card_names(accelerator, card, expected):
    assert device_table(accelerator, card)[1].name == expected


def test_an_unknown_table_is_one_line_naming_the_shipped_ones(tmp_path):
    with pytest.raises(UserError, match="--device_rates .*h100"):
        load_table("no-such-card")
    (tmp_path / "bad.yaml").write_text("name: x\n")
    with pytest.raises(UserError, match="not a calibration table"):
        load_table(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("full", ["full"] * 4), (["none", "selective", "full", "none"], ["none", "selective", "full", "none"])],
)
def test_layer_policies_take_one_policy_or_one_per_block(mode, expected):
    assert layer_policies(mode, 4) == expected


@pytest.mark.parametrize("mode", [["none", "full"], "auto", ["none", "bogus", "full", "full"]])
def test_a_wrong_mix_is_one_line(mode):
    with pytest.raises(UserError, match="activation_checkpointing.*4 blocks"):
        layer_policies(mode, 4)


@pytest.mark.processes
def test_calibrate_writes_a_table_the_plan_predicts_with(tmp_path, capsys):
    table = tmp_path / "rates.yaml"
    assert cli_main(["plan", "calibrate", "--processes", "1", "--out", str(table)]) == 0
    rows = yaml.safe_load(table.read_text())["processes"]
    assert list(rows) == [1] and rows[1]["large_matmul_tflops"] > 0
    capsys.readouterr()
    assert cli_main(["plan", "--config", "configs/tiny/pretrain.yaml", "--device_rates", str(table)]) == 0
    assert "predicted step time" in capsys.readouterr().out


def test_plan_prints_no_step_time_where_auto_ranks_by_flops_only(capsys):
    """plan and fit's `auto` take the same shipped table; where none is shipped (an NPU), auto ranks by FLOPs
    only and plan prints no step time, rather than one priced at a made-up rate."""
    config = ["plan", "--config", "configs/tiny/pretrain.yaml", "--trainer.accelerator", "npu"]
    assert cli_main(config) == 0
    assert "predicted step time: no calibration table for this accelerator" in capsys.readouterr().out


def test_a_timing_waits_for_the_devices_queue_before_and_after_the_clock(monkeypatch):
    """An accelerator queues kernels and returns at once: a clock read without synchronizing times the launches."""
    events = []
    monkeypatch.setattr(device_rates, "synchronize", lambda device: events.append(f"synchronize {device}"))
    device_rates._seconds(lambda: events.append("run"), 3, torch.device("cuda"))
    assert events == ["run", "synchronize cuda", "run", "run", "run", "synchronize cuda"]
