"""The benchmark harness's own logic (no timings are asserted): target checks, report, plot, GPU script dry run."""

from __future__ import annotations

import pytest

from mistral_lightning.benchmarks import gpu
from mistral_lightning.benchmarks.report import check_targets, markdown, plot
from mistral_lightning.benchmarks.train_throughput import fit_config

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


def test_gpu_layer_count_fills_the_device():
    # 10 GB fixed + 2 GB per layer on a 40 GB budget: 1 + (40 - 12) // 2 = 15 layers, capped at the model's 32.
    assert gpu.layers_that_fit(12 * GB, 14 * GB, 40 * GB, most=32) == 15
    assert gpu.layers_that_fit(1 * GB, 2 * GB, 80 * GB, most=32) == 32


def test_gpu_script_dry_run_on_cpu(tmp_path):
    report = gpu.main(
        ["--dry-run", "--seq", "128", "--steps", "1", "--peak-tflops", "1", "--out", str(tmp_path / "r.json")]
    )
    assert report["layers"] == 2 and report["tokens_per_sec_per_device"] > 0 and 0 < report["mfu"] < 1
    assert (tmp_path / "r.json").exists()
