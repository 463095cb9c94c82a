"""The benchmark harness's own logic (no timings are asserted): target checks, report, plot, GPU script dry run."""

from __future__ import annotations

import json

import pytest

import mistral_lightning.training.layouts as layouts_file
from mistral_lightning.benchmarks import gpu
from mistral_lightning.benchmarks.report import check_targets, markdown, plot
from mistral_lightning.benchmarks.train_throughput import fit_config
from mistral_lightning.training.device_rates import load_table
from mistral_lightning.training.layouts import layout_to_json, predict_step_time, simulate_layout
from mistral_lightning.training.memory_plan import MemoryReport

GB = 10**9


def run(tokens_per_s: float, peak_gb: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "peak_rss_bytes": int(peak_gb * GB)}


ROWS = [
    {
        "seq_length": 2048,
        "activation_checkpointing": "none",
        "ours": run(900, 2),
        "transformers": run(500, 2.4),
        "speedup": 1.8,
        "memory_ratio": 2 / 2.4,
    },
    {
        "seq_length": 8192,
        "activation_checkpointing": "none",
        "ours": run(850, 3),
        "transformers": run(300, 7.8),
        "speedup": 850 / 300,
        "memory_ratio": 3 / 7.8,
    },
    {"seq_length": 32768, "activation_checkpointing": "none", "ours": run(700, 9), "transformers": None},
]


def test_targets_name_each_miss():
    verdicts = {what: passed for what, passed, _ in check_targets(ROWS, mfu=0.3)}
    assert verdicts["seq 2048: >= 1.5x transformers tokens/s"] is True
    assert verdicts["seq 8192: >= 3.5x transformers tokens/s"] is False
    assert verdicts["seq 8192: <= 0.4x transformers peak memory"] is True
    assert verdicts["seq 32768: peak RSS <= 8 GB"] is False
    assert verdicts["seq 32768: >= 80% of our seq-2048 tokens/s"] is False


def test_markdown_and_plot(tmp_path):
    machine = {
        "cpu": "test CPU",
        "cores": 2,
        "memory_gb": 8,
        "torch": "x",
        "lightning": "y",
        "load_average": [0],
    }
    table = markdown(ROWS, machine, peak_tflops=1.0, mfu=None)
    assert "| 32768 | 700 | — |" in table and "| NO |" in table
    pytest.importorskip("matplotlib")
    assert plot(ROWS, tmp_path / "plot.png").stat().st_size > 0


def test_fit_config_runs_our_callbacks_on_the_real_data_path():
    config = fit_config(
        {"num_layers": 1}, "data/x_text_document", 2048, 3, "/tmp/w", "/tmp/o.json", "none", 0.2, True
    )
    callbacks = [cb["class_path"].rsplit(".", 1)[-1] for cb in config["trainer"]["callbacks"]]
    assert callbacks == ["RecipeThroughputMonitor", "MemoryMonitor", "ResultWriter"]
    assert config["data"]["class_path"].endswith("PretrainDataModule")
    assert config["model"]["parallel"]["compile"] is True


TINY_DEPTHS = range(1, 5)


@pytest.fixture(scope="module")
def tiny_depth_plans():
    """gpu.py's dry-run model planned at every depth without checkpointing, and at two layers fully checkpointed."""
    full = gpu.bench_model(dry_run=True, seq=128)

    def plan(layers: int, policy: str):
        return simulate_layout(gpu.bench_layout(full.replace(num_layers=layers), 128, policy))

    return full, [plan(layers, "none") for layers in TINY_DEPTHS], plan(2, "full")


def test_gpu_depth_is_the_deepest_the_plan_fits(tiny_depth_plans):
    full, plans, _ = tiny_depth_plans
    peaks = [plan.peak_bytes for plan in plans]
    assert peaks == sorted(peaks)
    for budget, expected in (((peaks[1] + peaks[2]) / 2, 2), (peaks[3] + 1, 4)):
        layers, report = gpu.deepest_that_fits(full, 128, "none", budget)
        assert layers == expected and report.peak_bytes == peaks[expected - 1]


@pytest.mark.parametrize(
    "per_layer_after_two, expected",
    [(3, 4), (1, 10)],  # steeper than the 1-to-2 line (it over-picks 6), then shallower (it under-picks 6)
)
def test_gpu_depth_walks_from_the_line_to_the_plan(monkeypatch, per_layer_after_two, expected):
    # Planned peaks 10, 12, then 12 + k per layer: the line through depths 1 and 2 reaches the budget of 20 at 6.
    def peak(layers: int) -> int:
        return 10 if layers == 1 else 12 + per_layer_after_two * (layers - 2)

    monkeypatch.setattr(
        gpu,
        "simulate_layout",
        lambda layout: MemoryReport(peak(layout.model.num_layers), {}, {}, {}, "", 0.0),
    )
    full = gpu.bench_model(dry_run=True, seq=128).replace(num_layers=12)
    assert gpu.deepest_that_fits(full, 128, "none", 20)[0] == expected


def test_gpu_auto_mixes_blocks_where_none_does_not_fit(tiny_depth_plans, monkeypatch):
    full, plans, everything_full = tiny_depth_plans
    # Two layers: room for both fully checkpointed and some, not for both without checkpointing.
    budget = (everything_full.peak_bytes + plans[1].peak_bytes) / 2
    table = load_table("cpu-2core")
    simulated = []
    simulate = layouts_file._simulate_layout
    monkeypatch.setattr(
        layouts_file,
        "_simulate_layout",
        lambda layout: simulated.append(layout_to_json(layout)) or simulate(layout),
    )
    planned = gpu.plan_run(full, 128, "auto", 2, budget / 0.9, 0.1, table)
    assert len(simulated) == len(set(simulated)), "a layout was simulated twice"
    assert planned.layers == 2 and "full" in planned.policies and set(planned.policies) != {"full"}
    assert planned.planned_peak_bytes <= budget
    layout = gpu.bench_layout(full.replace(num_layers=2), 128, "full")
    assert planned.predicted_s_per_step < predict_step_time(layout, everything_full, table).seconds


def test_gpu_script_dry_run_on_cpu(tmp_path):
    report = gpu.main(
        ["--dry-run", "--seq", "128", "--steps", "1", "--peak-tflops", "1", "--layers", "2"]
        + ["--activation-checkpointing", "none", "--out", str(tmp_path / "r.json")]
    )
    assert report["layers"] == 2 and report["tokens_per_sec_per_device"] > 0 and 0 < report["mfu"] < 1
    assert report["planned_peak_memory_bytes"] <= 0.9 * report["device_memory_bytes"]
    assert (
        json.loads((tmp_path / "r.json").read_text())["activation_checkpointing"]
        == report["activation_checkpointing"]
    )


def test_gpu_plan_only_plans_for_a_named_card_without_one():
    report = gpu.main(
        ["--plan-only", "NVIDIA H200", "--memory-gb", "149", "--layers", "1", "--seq", "256"]
        + ["--activation-checkpointing", "full"]
    )
    assert report["calibration_table"] == "h200" and report["layers"] == 1
    assert 0 < report["planned_peak_memory_bytes"] < 0.9 * 149e9 and report["predicted_s_per_step"] > 0
