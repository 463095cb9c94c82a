"""`plan --search` and `activation_checkpointing: auto`: the layouts that fit, fastest first, and the mix `fit`
takes. Budgets are set between the planned peaks of the uniform policies, so that "none" does not fit and
"full" does; what is fastest is decided by the plan's own prediction (its agreement with measured step times is
benchmarks/results/plan_step_time.md; tests never assert timings)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from helpers.configs import tiny_fit_config, write_config
from helpers.training import datamodule, module, trainer

import mistral_lightning.training.module as module_file
from mistral_lightning.cli import main as cli_main
from mistral_lightning.cli.plan import layout_from_config, parse_config
from mistral_lightning.training.device_rates import load_table
from mistral_lightning.training.layouts import search_layouts, simulate_layout
from mistral_lightning.training.parallel import layer_policies

SEQ, MICRO = 64, 2


@pytest.fixture(scope="module")
def tiny_config(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    # Loss chunks shorter than a batch: the plan then prices one labelling, not two.
    config = tiny_fit_config(
        root, toy_data, seq_length=SEQ, micro_batch_size=MICRO, model={"loss_chunk_size": 64}
    )
    return write_config(config, root / "fit.yaml")


@pytest.fixture(scope="module")
def uniform_peaks(tiny_config):
    """The planned peak of the tiny layout with every block "none", "selective" and "full"."""
    layout = layout_from_config(parse_config(["--config", str(tiny_config)]))
    peaks = {}
    for policy in ("none", "selective", "full"):
        parallel = dataclasses.replace(layout.parallel, activation_checkpointing=policy)
        peaks[policy] = simulate_layout(dataclasses.replace(layout, parallel=parallel)).peak_bytes
    assert peaks["full"] < peaks["selective"] < peaks["none"]
    return layout, peaks


def _budget_between(peaks, headroom=0.1) -> float:
    """A device whose budget (less the headroom) fits "full" but not "none"."""
    return (peaks["full"] + peaks["none"]) / 2 / (1 - headroom)


def test_search_keeps_what_fits_fastest_first(uniform_peaks):
    layout, peaks = uniform_peaks
    capacity = _budget_between(peaks)
    candidates = search_layouts(layout, capacity, load_table("cpu-2core"), layouts=[layout])
    rates = [c.prediction.tokens_per_second_per_device for c in candidates]
    assert rates == sorted(rates, reverse=True) and candidates[0].simulated
    assert all(c.peak_bytes <= 0.9 * capacity for c in candidates)
    chosen = layer_policies(candidates[0].layout.parallel.activation_checkpointing, layout.model.num_layers)
    # "none" everywhere does not fit; the fastest that does keeps some blocks lighter than "full".
    assert chosen != ["none"] * len(chosen) and chosen != ["full"] * len(chosen)
    full = next(c for c in candidates if c.layout.parallel.activation_checkpointing == ["full"] * len(chosen))
    assert candidates[0].prediction.seconds < full.prediction.seconds


def test_search_writes_the_fastest_as_a_config_fit_reads(tiny_config, uniform_peaks, tmp_path, capsys):
    _, peaks = uniform_peaks
    written = tmp_path / "chosen.yaml"
    argv = ["plan", "--config", str(tiny_config), "--search", "true", "--write_config", str(written)]
    assert cli_main([*argv, "--device_memory_gb", str(_budget_between(peaks) / 1e9)]) == 0
    table = capsys.readouterr().out
    assert "| 1 |" in table and f"wrote {written}" in table
    config = parse_config(["--config", str(written)])  # what fit parses
    chosen = layout_from_config(config)
    assert chosen.step.micro_batch_size * chosen.step.micro_batches == MICRO
    assert written.read_text().startswith("# written by mistral-lightning plan --search:")
    assert "device_memory_gb" not in yaml.safe_load(written.read_text())
    # Nothing else is overwritten: the same target again is refused without --plan_overwrite.
    assert cli_main([*argv, "--device_memory_gb", "1"]) != 0


@pytest.mark.processes
def test_fit_with_auto_takes_a_mix_that_fits_where_none_does_not(
    uniform_peaks, toy_data, single_thread, monkeypatch, tmp_path, caplog
):
    _, peaks = uniform_peaks
    capacity = _budget_between(peaks)
    monkeypatch.setattr(module_file, "total_memory", lambda *args: capacity)
    with caplog.at_level("INFO"):
        trainer(tmp_path, max_steps=1).fit(
            module(parallel={"activation_checkpointing": "auto"}),
            datamodule=datamodule(toy_data, seq_length=SEQ, global_batch=MICRO),
        )
    (line,) = [r.getMessage() for r in caplog.records if "activation_checkpointing auto:" in r.getMessage()]
    chosen = line.split("auto: ")[1].split(" (")[0]
    assert chosen not in ("none", "full") and "none" in chosen or "selective" in chosen, line
    planned = float(line.split("planned peak ")[1].split(" GB")[0]) * 1e9
    assert planned <= 0.9 * capacity + 0.005e9, line
    # model.parallel.compile's default, auto, says why it stays eager here.
    assert "compile auto: blocks eager (cpu, every batch seq_length wide)" in caplog.text
