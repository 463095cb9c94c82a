"""Training behaviour on one CPU process: exact resume after a kill, NaN handling, configuration errors
that stop a run before its first step, the optimizer and LR schedule, and the LightningCLI entry."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from helpers.training import Recorder, StepCounter, datamodule, module, trainer
from torch.utils.data import DataLoader

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.checkpoint.hf import CheckpointError
from mistral_lightning.cli import main as cli_main
from mistral_lightning.data.datamodules import InstructionDataModule, PretrainDataModule
from mistral_lightning.errors import UserError
from mistral_lightning.generation.loading import load_model as load_trained_model
from mistral_lightning.training.divergence import TrainingDivergedError
from mistral_lightning.training.optim import OptimizerConfig, build_optimizer, lr_factor
from mistral_lightning.training.parallel import compiles


@pytest.mark.processes
def test_resume_after_kill_repeats_the_straight_run_exactly(reference, killed_checkpoint, toy_data, tmp_path):
    recorder = Recorder()
    trainer(tmp_path, callbacks=[recorder]).fit(
        module(), datamodule=datamodule(toy_data), ckpt_path=killed_checkpoint
    )
    assert recorder.batches == reference.batches[3:]  # data position restored
    assert recorder.losses == reference.losses[3:]  # model, optimizer and LR schedule restored, bit for bit


class PoisonWeightsAtStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            with torch.no_grad():
                pl_module.model.lm_head.weight.to_local().fill_(float("nan"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(toy_data, single_thread, tmp_path):
    fit_trainer = trainer(tmp_path, callbacks=[PoisonWeightsAtStep()], checkpoint_every=1)
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 2") as stopped:
        fit_trainer.fit(module(), datamodule=datamodule(toy_data))
    assert "the last good checkpoint is" in str(stopped.value) and "step=2.ckpt" in str(stopped.value)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step=1.ckpt", "step=2.ckpt"]
    last_good = load_trained_model(tmp_path / "checkpoints" / "step=2.ckpt")
    assert all(torch.isfinite(p).all() for p in last_good.parameters())


def test_missing_data_prefix_fails_before_any_step(tmp_path):
    counter = StepCounter()
    data = InstructionDataModule(str(tmp_path / "nowhere" / "alpaca"), seq_length=32, num_workers=0)
    with pytest.raises(UserError, match="nowhere"):
        trainer(tmp_path, callbacks=[counter]).fit(module(), datamodule=data)
    assert counter.steps == 0


def test_pretrained_folder_with_mismatched_shapes_fails_before_any_step(toy_data, tmp_path):
    folder = tmp_path / "hf"
    Mistral(MistralConfig.from_name("tiny")).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    counter = StepCounter()
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*\[192, 64\].*\[128, 64\]"):
        trainer(tmp_path, callbacks=[counter]).fit(
            module(model_config=None, pretrained=str(folder)), datamodule=datamodule(toy_data)
        )
    assert counter.steps == 0
    # A preset that disagrees with the folder is refused when the module is built.
    with pytest.raises(UserError, match="intermediate_size: 192 vs 128"):
        module(model_config="tiny", pretrained=str(folder))


@pytest.mark.parametrize(
    ("setting", "device_type", "fixed_width", "context_parallel", "expected"),
    [
        ("auto", "cuda", True, False, True),
        ("auto", "cuda", False, False, False),  # each new batch width would compile the blocks again
        ("auto", "cuda", None, False, False),  # a DataModule that does not say
        ("auto", "cuda", True, True, False),
        ("auto", "cpu", True, False, False),
        ("auto", "npu", True, False, False),
        (True, "cpu", False, False, True),
        (False, "cuda", True, False, False),
    ],
)
def test_compile_auto_compiles_on_cuda_where_every_batch_has_one_width(
    setting, device_type, fixed_width, context_parallel, expected
):
    assert compiles(setting, device_type, fixed_width, context_parallel) is expected


def test_datamodules_say_whether_every_batch_has_one_width(toy_data):
    assert PretrainDataModule([toy_data], seq_length=32).fixed_width
    assert not InstructionDataModule("sft", seq_length=32).fixed_width
    assert InstructionDataModule("sft", seq_length=32, pad_to_multiple_of=32).fixed_width


def test_no_weight_decay_on_norms():
    model = Mistral(MistralConfig.from_name("tiny"))
    decay, no_decay = build_optimizer(model, OptimizerConfig(1e-3, 0.1, (0.9, 0.95), 1e-8)).param_groups
    norm_weights = {id(p) for name, p in model.named_parameters() if "norm" in name}
    assert {id(p) for p in no_decay["params"]} == norm_weights and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1


def test_lr_schedule_warmup_then_cosine_to_min_or_constant():
    def factor(step, schedule="cosine"):
        return lr_factor(step, warmup_steps=10, total_steps=110, min_ratio=0.1, schedule=schedule)

    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    assert factor(70, "constant") == 1.0


def test_print_config_shows_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "configs/mistral-7b-32k/finetune_tp8.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for expected in ("tensor_parallel_size: 8", "seq_length: 32768", "lr: 1.25e-06", "min_lr: 1.25e-07"):
        assert expected in printed


def test_predict_step_is_greedy_decoding(toy_data, single_thread, tmp_path):
    trained = module(max_new_tokens=5)
    fit_trainer = trainer(tmp_path, max_steps=1)
    fit_trainer.fit(trained, datamodule=datamodule(toy_data))
    prompts = [[1, 40, 41, 42], [1, 7]]
    (predicted,) = fit_trainer.predict(
        trained, dataloaders=DataLoader([{"input_ids": prompts}], batch_size=None)
    )
    for prompt, new_tokens in zip(prompts, predicted):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(5):  # argmax over the whole sequence each time: no cache, no generation code
                ids.append(int(trained.model(torch.tensor([ids]))[0, -1].argmax()))
        assert new_tokens == ids[len(prompt) :]
