"""`mistral-lightning plan` against the real thing: the simulated peak of the tiny model under TP2 against
the peak the CPU allocator reports for the same config trained by `fit` on two processes, the simulated
steady state against a hand count of each rank's shards, and on one process (the fused loss, whose memory
depends on the labels) the plan at least the peak of a run with the labelling that costs the loss most."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.configs import tiny_fit_config, write_config
from helpers.processes import without_process_group
from helpers.training import write_instruction_data, write_preference_data

from mistral_lightning.cli import main as mistral_lightning
from mistral_lightning.config import MistralConfig, parameter_shapes

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
TP = 2
MICRO_BATCH, SEQ_LENGTH, ACCUMULATE = 8, 128, 2


def tiny_tp2_config(data_prefix: str, root: Path) -> dict:
    return tiny_fit_config(
        root,
        data_prefix,
        tensor_parallel=TP,
        seq_length=SEQ_LENGTH,
        micro_batch_size=MICRO_BATCH,
        trainer={
            "accumulate_grad_batches": ACCUMULATE,
            "gradient_clip_val": 1.0,
            "callbacks": [
                {
                    "class_path": "mistral_lightning.benchmarks.allocator_peak.AllocatorPeak",
                    "init_args": {"out_dir": str(root / "measured")},
                }
            ],
        },
        model={"model_config": "tiny", "parallel": {"sequence_parallel": True}},
    )


def run(command: list[str], cwd: Path) -> None:
    env = {
        **without_process_group(os.environ),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "mistral_lightning", *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def tiny_tp2(toy_data, tmp_path_factory) -> tuple[dict, list[dict]]:
    """The plan of the config, and what each rank of a real `fit` of it measured."""
    root = tmp_path_factory.mktemp("plan_tiny_tp2")
    config = root / "fit.yaml"
    config.write_text(json.dumps(tiny_tp2_config(toy_data, root)))  # JSON is YAML
    run(["plan", "--config", str(config), "--plan_output", str(root / "plan.json")], root)
    run(["fit", "--config", str(config)], root)  # Lightning starts the second process itself
    measured = [json.loads((root / "measured" / f"rank{rank}.json").read_text()) for rank in range(TP)]
    return json.loads((root / "plan.json").read_text()), measured


@pytest.fixture(scope="module")
def tiny_cp2(toy_data, tmp_path_factory) -> tuple[dict, list[dict]]:
    """The same for context parallelism: sequences of 512 split over 2 ranks, the window (64) inside a shard."""
    root = tmp_path_factory.mktemp("plan_tiny_cp2")
    settings = tiny_tp2_config(toy_data, root)
    settings["trainer"]["strategy"] = {
        "class_path": "mistral_lightning.training.strategy.DeviceModelParallelStrategy",
        "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1, "context_parallel_size": 2},
    }
    settings["data"]["init_args"]["seq_length"] = 512
    config = root / "fit.yaml"
    config.write_text(json.dumps(settings))
    run(["plan", "--config", str(config), "--plan_output", str(root / "plan.json")], root)
    run(["fit", "--config", str(config)], root)
    measured = [json.loads((root / "measured" / f"rank{rank}.json").read_text()) for rank in range(2)]
    return json.loads((root / "plan.json").read_text()), measured


@pytest.mark.processes
@pytest.mark.parametrize("layout", ["tiny_tp2", "tiny_cp2"])
def test_simulated_peak_is_within_15_percent_of_each_ranks_measured_peak(request, layout):
    plan, measured = request.getfixturevalue(layout)
    predicted = plan["report"]["peak_bytes"]
    for rank in measured:
        assert rank["steps"] == 2
        assert predicted == pytest.approx(rank["peak_allocated_bytes"], rel=0.15)


ONE_PROCESS_MICRO_BATCH = 4


def one_process_plan_and_peak(root: Path, data: str, datamodule: str, model: dict, fit) -> tuple[dict, dict]:
    """The plan of one process over `data` (rows of SEQ_LENGTH, gradient clipping on) and the peak the allocator
    measured while `fit(config)` trained the same config."""
    settings = tiny_fit_config(
        root,
        data,
        trainer={"callbacks": tiny_tp2_config(data, root)["trainer"]["callbacks"], "gradient_clip_val": 1.0},
        model=model,
        data={
            "class_path": f"mistral_lightning.data.datamodules.{datamodule}",
            "init_args": {
                "data_prefix": data,
                "seq_length": SEQ_LENGTH,
                "micro_batch_size": ONE_PROCESS_MICRO_BATCH,
            }
            | {"split": "1,0,0", "num_workers": 0},
        },
    )
    config = write_config(settings, root / "fit.yaml")
    assert mistral_lightning(["plan", "--config", str(config), "--plan_output", str(root / "plan.json")]) == 0
    assert fit(config) == 0
    measured = json.loads((root / "measured" / "rank0.json").read_text())
    return json.loads((root / "plan.json").read_text()), measured


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> tuple[dict, dict]:
    """The plan of one process on instruction data labelled everywhere but each sample's last position (4 × 128
    positions: one chunk of logits), and the peak of `fit` on it, both run here. With every position labelled the
    fused loss works on the hidden states in place; with an unlabelled one it copies the labelled rows and their
    gradient, which here outweighs the row of logits it saves: the plan without the copies was 85 KB short."""
    root = tmp_path_factory.mktemp("plan_tiny_sft")
    data = write_instruction_data(str(root / "sft"), [(0, SEQ_LENGTH)] * 2 * ONE_PROCESS_MICRO_BATCH)
    fit = lambda config: mistral_lightning(["fit", "--config", str(config)])  # noqa: E731
    return one_process_plan_and_peak(root, data, "InstructionDataModule", {}, fit)


def assert_two_steps_planned_within_15_percent_above(plan: dict, measured: dict) -> None:
    """The run took its two steps, and the plan covers its peak with at most 15% to spare."""
    assert measured["steps"] == 2
    assert (
        measured["peak_allocated_bytes"]
        <= plan["report"]["peak_bytes"]
        <= 1.15 * measured["peak_allocated_bytes"]
    )


def test_the_plan_covers_the_loss_at_its_most_expensive_labelling(tiny_sft):
    plan, measured = tiny_sft
    assert_two_steps_planned_within_15_percent_above(plan, measured)


@pytest.fixture(scope="module", params=["full", "lora"])
def tiny_dpo(request, tmp_path_factory) -> tuple[dict, dict]:
    """The plan of one DPO process and the peak of `fit` on it: rows of one pair whose answers fill them (a
    2-token prompt, two answers of 63), full fine-tuning against a frozen copy, or LoRA against its adapters off."""
    root = tmp_path_factory.mktemp(f"plan_tiny_dpo_{request.param}")
    data = write_preference_data(str(root / "pairs"), [(2, 63, 63)] * 2 * ONE_PROCESS_MICRO_BATCH)
    lora = {"lora": {"rank": 8, "alpha": 16, "targets": ["q", "k", "v", "o", "gate", "up", "down"]}}
    model = {"objective": {"kind": "dpo"}, **(lora if request.param == "lora" else {})}

    def fit(config: Path) -> int:
        # In its own process, as a user runs it: the allocator counts every live tensor of the process, and an
        # earlier in-process fit of this worker leaves some alive (FSDP2's module state).
        run(["fit", "--config", str(config)], root)
        return 0

    return one_process_plan_and_peak(root, data, "PreferenceDataModule", model, fit)


@pytest.mark.processes
def test_the_plan_covers_a_dpo_step_with_its_reference(tiny_dpo):
    plan, measured = tiny_dpo
    assert_two_steps_planned_within_15_percent_above(plan, measured)


def shard_elements(config: MistralConfig, tp: int) -> int:
    """Elements one TP rank holds: vocabulary rows of the embedding and LM head, output rows of q/k/v/gate/up,
    input columns of o/down are split tp ways; the norms are replicated."""
    return sum(
        math.prod(shape) // (1 if name.endswith("norm.weight") else tp)
        for name, shape in parameter_shapes(config).items()
    )


@pytest.mark.processes
def test_steady_state_is_the_hand_count_of_each_ranks_shards(tiny_tp2):
    plan, _ = tiny_tp2
    fp32 = 4 * shard_elements(MistralConfig.from_name("tiny"), TP)
    after_step = plan["report"]["after_step"]
    assert after_step["parameters"] == fp32
    # Lightning zeroes the gradients at the next step's first backward, so they outlive the optimizer step.
    assert after_step["gradients"] == fp32
    # AdamW: exp_avg and exp_avg_sq per parameter, plus one step counter (a 4-byte scalar) per parameter tensor.
    tensors = len(parameter_shapes(MistralConfig.from_name("tiny")))
    assert after_step["optimizer_state"] == 2 * fp32 + 4 * tensors


def test_a_layout_that_does_not_match_the_devices_is_one_line_naming_the_options(tmp_path, toy_data, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text(json.dumps(tiny_tp2_config(toy_data, tmp_path)))
    status = mistral_lightning(
        ["plan", "--config", str(config), "--trainer.strategy.init_args.data_parallel_size", "2"]
    )
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert len(error.splitlines()) == 1
    assert (
        "data_parallel_size=2 x context_parallel_size=1 x tensor_parallel_size=2" in error
        and "trainer.devices x trainer.num_nodes" in error
    )
