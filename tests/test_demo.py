"""`make demo`'s path end to end, shortened to 120 steps: every command it runs (demo-data, preprocess,
fit, export, generation, MMLU, the LoRA leg from the halfway checkpoint, 40 DPO steps over the fine-tuned
model) and what it reports; that it
writes only under its own folder, leaving the user's runs of the tiny configs alone, and replaces only a
folder of its own.

The demo's claim that the full 1200-step run beats chance on synthetic MMLU needs about 900 steps of
learning, four minutes of CPU: `make demo` checks it itself and exits 1 when it does not hold.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.processes import without_process_group

from mistral_lightning.demo import pipeline as demo
from mistral_lightning.demo.pipeline import DemoPaths, DemoScores
from mistral_lightning.demo.preference import PairRanking
from mistral_lightning.tokenizer import default_tokenizer_path

REPO = Path(__file__).resolve().parents[1]
STEPS = 120
DPO_STEPS = 40


@pytest.mark.processes
@pytest.mark.slow
def test_the_shortened_demo_runs_every_command_and_scores_both_legs(tmp_path, monkeypatch):
    # The demo reads configs/ and writes its folder relative to the working directory.
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    # The user's own runs of the tiny configs, where those configs read and write.
    mine = {
        Path("runs/tiny-finetune/checkpoints/last.ckpt"): b"my checkpoint",
        Path("runs/tiny-lora/lightning_logs/version_0/metrics.csv"): b"my metrics",
        Path("runs/tiny-dpo/checkpoints/last.ckpt"): b"my DPO checkpoint",
        Path("demo_output/data/preference_packed_chosen_input_ids_document.bin"): b"my pairs",
        Path("demo_output/data/alpaca_packed_input_ids_document.bin"): b"my data",
        Path("demo_output/raw/alpaca/train.parquet"): b"my rows",
    }
    for path, content in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    # The demo's `fit` runs are child processes, which must not join a process group an earlier test left up.
    for name in set(os.environ) - set(without_process_group(dict(os.environ))):
        monkeypatch.delenv(name)
    # 40 MMLU questions, not 200: 120 steps do not learn the MMLU format, so the score checks only its range.
    scores = demo.run(max_steps=STEPS, heldout=20, mmlu_per_subject=10, dpo_steps=DPO_STEPS)
    print(scores)  # the figures, in the log of a failing run or with -s
    # It wrote under its own folder only; the user's files are as they were.
    outside = {p for p in Path(".").rglob("*") if p.is_file() and not p.is_relative_to(demo.OUT_DIR)}
    assert outside == set(mine) and all(path.read_bytes() == content for path, content in mine.items())
    paths = DemoPaths(demo.OUT_DIR)
    # Trained from scratch, its export carries the tokenizer the demo's data was tokenized with.
    assert (paths.hf / "tokenizer.model").read_bytes() == default_tokenizer_path().read_bytes()
    # Both fits ran their steps (the LoRA leg from the halfway checkpoint) and logged their summary rows.
    assert demo.first_checkpoint(paths.run_dir)[1] == STEPS // 2
    assert demo.run_summary(paths.run_dir)["summary/iterations"] == STEPS
    assert demo.run_summary(paths.lora_run_dir)["summary/iterations"] == STEPS // 2
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
    # DPO ran its steps over the fine-tuned model's export, and held-out pairs rank the right answer first more
    # often, by a wider log-probability margin, than before it.
    assert demo.run_summary(paths.dpo_run_dir)["summary/iterations"] == DPO_STEPS
    before, after = scores.before_dpo, scores.after_dpo
    assert after.chosen_first > before.chosen_first, scores
    assert after.chosen_log_prob - after.rejected_log_prob > before.chosen_log_prob - before.rejected_log_prob


@pytest.mark.parametrize(
    "heldout_after, mmlu_after, learned", [(0.5, 0.36, True), (0.5, 0.35, False), (0.0, 0.9, False)]
)
def test_the_full_demo_claims_learning_only_above_three_standard_deviations(
    heldout_after, mmlu_after, learned
):
    assert DemoScores(0.0, heldout_after, 0.25, mmlu_after).learned() is learned


@pytest.mark.parametrize("after, learned", [(0.6, True), (0.5, False)])
def test_the_full_demo_claims_dpo_learned_only_when_more_pairs_rank_right(after, learned):
    before_dpo, after_dpo = PairRanking(0.5, -20.0, -20.0), PairRanking(after, -18.0, -25.0)
    scores = DemoScores(0.0, 0.5, 0.25, 0.4, before_dpo=before_dpo, after_dpo=after_dpo)
    assert scores.learned() is learned


def test_the_demo_replaces_only_a_folder_it_wrote(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert demo.main(["--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"--out {mine}: holds files the demo did not write" in err and len(err.splitlines()) == 1, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # A folder of an earlier demo (its marker) is emptied and marked again; a missing one is made.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / demo.MARKER).write_text("")
    (earlier / "runs").mkdir()
    for folder in (earlier, tmp_path / "new"):
        demo.fresh_output(folder)
        assert [p.name for p in folder.iterdir()] == [demo.MARKER]
