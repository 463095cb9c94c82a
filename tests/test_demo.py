"""`make demo`'s path end to end, shortened to 120 steps: every command it runs (demo-data, preprocess,
fit, export, generation, MMLU, the LoRA leg from the halfway checkpoint) and what it reports.

The demo's claim that the full 1200-step run beats chance on synthetic MMLU needs about 900 steps of
learning, four minutes of CPU: `make demo` checks it itself and exits 1 when it does not hold.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.processes import without_process_group

from mistral_lightning.demo import pipeline as demo
from mistral_lightning.demo.pipeline import DemoScores

REPO = Path(__file__).resolve().parents[1]
STEPS = 120


@pytest.mark.processes
@pytest.mark.slow
def test_the_shortened_demo_runs_every_command_and_scores_both_legs(tmp_path, monkeypatch):
    # The demo reads configs/ and writes demo_output/ and runs/ relative to the working directory.
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    # The demo's `fit` runs are child processes, which must not join a process group an earlier test left up.
    for name in set(os.environ) - set(without_process_group(dict(os.environ))):
        monkeypatch.delenv(name)
    scores = demo.run(max_steps=STEPS, heldout=20)
    print(scores)  # the figures, in the log of a failing run or with -s
    # Both fits ran their steps (the LoRA leg from the halfway checkpoint) and logged their summary rows.
    assert demo.first_checkpoint(demo.RUN_DIR)[1] == STEPS // 2
    assert demo.run_summary(demo.RUN_DIR)["summary/iterations"] == STEPS
    assert demo.run_summary(demo.LORA_RUN_DIR)["summary/iterations"] == STEPS // 2
    for result in (scores.full, scores.lora):
        assert result.peak_memory_mib > 0 and result.tokens_per_sec > 0, result
    # 120 steps learn the one-word answers ("How many words are there?") but not the MMLU format.
    assert scores.heldout_after > scores.heldout_before, scores
    assert 0 <= scores.mmlu_after <= 1 and 0 <= scores.mmlu_before <= 1, scores
    # The LoRA leg: adapters (rank 8 on the 7 block projections: 4 layers x 8 x (in + out) summed).
    hidden, intermediate, kv, vocab = 128, 384, 2 * 32, 32000
    per_layer = 8 * ((hidden + 4 * 32) + (hidden + kv) * 2 + (4 * 32 + hidden) + (hidden + intermediate) * 2)
    per_layer += 8 * (intermediate + hidden)
    assert scores.lora.trainable_params == 4 * per_layer, scores.lora
    assert scores.lora.heldout >= scores.start.heldout, scores
    # Full fine-tuning trains everything: embedding and head, and per block q, k, v, o, gate, up, down, 2 norms.
    block = hidden * 4 * 32 + 2 * hidden * kv + 4 * 32 * hidden + 3 * hidden * intermediate + 2 * hidden
    assert scores.full.trainable_params == 2 * vocab * hidden + 4 * block + hidden, scores.full


@pytest.mark.parametrize(
    "heldout_after, mmlu_after, learned", [(0.5, 0.36, True), (0.5, 0.35, False), (0.0, 0.9, False)]
)
def test_the_full_demo_claims_learning_only_above_three_standard_deviations(
    heldout_after, mmlu_after, learned
):
    assert DemoScores(0.0, heldout_after, 0.25, mmlu_after).learned() is learned
