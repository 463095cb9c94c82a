"""The CLI without traps: what `--help` offers works or is refused in one line, short class names resolve,
a missing device or package is one line naming the option and the fix, an empty eval split is an error,
and a resumed run says nothing false (no "dataloader is not resumable", no library noise).

References: Lightning's own Trainer and warnings, importlib.metadata for the version, torch's device
registry, and an uninterrupted run for the resumed data order.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers.checkpoints import fit_config, logged_losses, one_line_error

from mistral_lightning.cli import main as cli_main
from mistral_lightning.data.datamodules import PretrainDataModule
from mistral_lightning.devices import check_device_available
from mistral_lightning.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- 1. optimizer options
def test_fit_help_offers_no_optimizer_or_lr_scheduler(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    help_text = capsys.readouterr().out
    assert "--model.optimizer" in help_text and "--model.schedule" in help_text
    assert "--optimizer " not in help_text and "--lr_scheduler " not in help_text


@pytest.mark.parametrize("option", ["--optimizer=Adam", "--optimizer.lr", "--lr_scheduler"])
def test_optimizer_options_point_to_model_optimizer(toy_data, tmp_path, capsys, option):
    argv = ["fit", "--config", str(fit_config(tmp_path, toy_data)), *option.split(" "), "StepLR"]
    error = one_line_error(capsys, argv if "=" not in option else argv[:-1])
    assert option.split("=")[0].split(".")[0] in error
    assert "model.optimizer" in error and "model.schedule" in error


# ---------------------------------------------------------------------- 2. DataModule short names
def test_datamodule_short_names_resolve(toy_data, tmp_path, capsys):
    config = fit_config(tmp_path, toy_data)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--data.help", "InstructionDataModule"])
    assert exit_.value.code == 0
    assert "--data.data_prefix DATA_PREFIX" in capsys.readouterr().out
    argv = [
        "fit",
        "--config",
        str(config),
        "--data",
        "PretrainDataModule",
        "--data.data_prefixes",
        f"[{toy_data}]",
    ]
    with pytest.raises(SystemExit) as exit_:
        cli_main([*argv, "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "mistral_lightning.data.datamodules.PretrainDataModule"
    assert printed["data"]["init_args"]["data_prefixes"] == [toy_data]


def _printed_config(capsys, argv: list[str]) -> dict:
    with pytest.raises(SystemExit) as exit_:
        cli_main([*argv, "--print_config"])
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_our_callbacks_resolve_by_short_name(toy_data, tmp_path, capsys):
    config = fit_config(tmp_path, toy_data)
    printed = _printed_config(capsys, ["fit", "--config", str(config), "--trainer.callbacks+=MemoryMonitor"])
    paths = [callback["class_path"] for callback in printed["trainer"]["callbacks"]]
    assert paths[-1] == "mistral_lightning.callbacks.MemoryMonitor"


def test_throughput_monitor_names_cannot_be_confused(toy_data, tmp_path, capsys):
    """Ours is RecipeThroughputMonitor; the short name ThroughputMonitor is Lightning's alone (it was refused as
    ambiguous before the rename), and our package has no such name."""
    config = fit_config(tmp_path, toy_data)
    argv = ["fit", "--config", str(config)]
    printed = _printed_config(capsys, [*argv, "--trainer.callbacks+=RecipeThroughputMonitor"])
    assert (
        printed["trainer"]["callbacks"][-1]["class_path"]
        == "mistral_lightning.callbacks.RecipeThroughputMonitor"
    )
    lightning_monitor = "--trainer.callbacks+=ThroughputMonitor"
    printed = _printed_config(
        capsys, [*argv, lightning_monitor, "--trainer.callbacks.batch_size_fn=builtins.len"]
    )
    assert (
        printed["trainer"]["callbacks"][-1]["class_path"] == "lightning.pytorch.callbacks.ThroughputMonitor"
    )
    import mistral_lightning.callbacks as callbacks

    assert not hasattr(callbacks, "ThroughputMonitor")


# ---------------------------------------------------------------------- 4. one line instead of a traceback
def test_npu_accelerator_without_torch_npu_is_one_line(toy_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "torch_npu", None
    )  # `import torch_npu` fails, as on a machine without it
    config = fit_config(tmp_path, toy_data)
    error = one_line_error(capsys, ["fit", "--config", str(config), "--trainer.accelerator", "npu"])
    assert "trainer.accelerator" in error and "torch_npu" in error and "mistral-lightning[npu]" in error


def test_an_unavailable_lightning_accelerator_is_one_line(toy_data, tmp_path, capsys):
    assert not torch.backends.mps.is_available()  # Apple GPUs: absent on the Linux machines tests run on
    config = fit_config(tmp_path, toy_data)
    error = one_line_error(capsys, ["fit", "--config", str(config), "--trainer.accelerator", "mps"])
    assert "MPSAccelerator" in error and "not available" in error


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        # One past the last CUDA device: absent on every machine, CPU-only torch or not.
        (f"cuda:{torch.cuda.device_count()}", "cuda"),
        ("cuda:x", "not a device"),
        ("npu", "torch_npu"),
    ],
)
def test_an_unavailable_device_is_one_line(device, expected, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(UserError) as error:
        check_device_available(device, "--device")
    assert "--device" in str(error.value) and expected in str(error.value)
    assert "\n" not in str(error.value)
    assert check_device_available("cpu", "--device") == torch.device("cpu")
    missing = tmp_path / "no-checkpoint"  # the device is checked before anything is read
    for argv in (["generate", "--prompt", "x"], ["evaluate", "--data-dir", str(tmp_path)]):
        line = one_line_error(capsys, [*argv, "--checkpoint", str(missing), "--device", device])
        assert "--device" in line and expected in line, argv[0]


@pytest.mark.parametrize(("command", "split"), [("validate", "validation"), ("test", "test")])
def test_an_eval_run_on_an_empty_split_is_one_line(toy_data, tmp_path, capsys, command, split):
    config = fit_config(tmp_path, toy_data)  # split "1,0,0": every document trains
    # fit_config turns validation off during fit (limit_val_batches 0); a user's validate run has it on.
    error = one_line_error(capsys, [command, "--config", str(config), "--trainer.limit_val_batches", "1.0"])
    assert f"the {split} split" in error and "data.init_args.split" in error and "'1,0,0'" in error


@pytest.mark.parametrize(
    ("logger", "package"), [("CometLogger", "comet-ml"), ("TensorBoardLogger", "tensorboardX")]
)
def test_a_logger_without_its_package_is_one_line(toy_data, tmp_path, capsys, logger, package):
    assert importlib.util.find_spec(package.replace("-", "_")) is None, (
        f"{package} must not be installed here"
    )
    config = fit_config(tmp_path, toy_data)
    error = one_line_error(capsys, ["fit", "--config", str(config), "--trainer.logger", logger])
    assert f"trainer.logger {logger}" in error and f"pip install -U '{package}" in error


# ---------------------------------------------------------------------- 5. version and help
def test_version_is_the_installed_distribution(capsys):
    assert cli_main(["--version"]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"mistral-lightning {importlib.metadata.version('mistral-lightning')}"
    )


def test_demo_data_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo-data", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 400)" in help_text and "(default: 0)" in help_text


# ---------------------------------------------------------------------- 6. honest resume, no noise
def _whole_corpus(prefix: str) -> PretrainDataModule:
    return PretrainDataModule([prefix], seq_length=32, micro_batch_size=2, split="1", num_workers=0)


class _RecordingModule(L.LightningModule):
    """Records the batches it trains on; the weight never changes (lr 0), so only the data order matters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_index):
        self.seen.append(batch["input_ids"].clone())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_train_dataloader_state_alone_resumes_mid_epoch_without_a_warning(toy_data, tmp_path):
    """Lightning saves the loader's state with the fit loop; with the DataModule's own state removed from the
    checkpoint, it alone puts the resumed run on the batches an uninterrupted run trains on."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    full = _RecordingModule()
    L.Trainer(max_steps=12, **options).fit(full, _whole_corpus(toy_data))
    trainer = L.Trainer(max_steps=5, **options)
    trainer.fit(_RecordingModule(), _whole_corpus(toy_data))
    trainer.save_checkpoint(tmp_path / "step5.ckpt")
    saved = torch.load(tmp_path / "step5.ckpt", weights_only=False)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"consumed_samples": 10}]
    del saved[PretrainDataModule.__qualname__]  # only the loader's state is left to resume from
    torch.save(saved, tmp_path / "step5.ckpt")
    resumed = _RecordingModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_steps=12, **options).fit(
            resumed, _whole_corpus(toy_data), ckpt_path=tmp_path / "step5.ckpt"
        )
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert len(full.seen) == 12 and len(resumed.seen) == 7
    assert all(torch.equal(a, b) for a, b in zip(full.seen[5:], resumed.seen))


def test_a_resumed_fit_is_exact_and_quiet(toy_data, tmp_path, caplog, single_thread):
    """Resume mid-epoch from step 2 of a 4-step run: the same losses, and none of the known noise."""
    straight = tmp_path / "straight"
    assert cli_main(["fit", "--config", str(fit_config(straight, toy_data)), "--trainer.max_steps", "4"]) == 0
    resumed = tmp_path / "resumed"
    config = fit_config(resumed, toy_data)
    shutil.copytree(straight / "checkpoints" / "step=2.ckpt", resumed / "checkpoints" / "last.ckpt")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        assert (
            cli_main(["fit", "--config", str(config), "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
        )
    said = [str(warning.message) for warning in caught] + [record.getMessage() for record in caplog.records]
    for noise in ("not resumable", "litlogger", "litmodels", "LeafSpec", "overwriting", "register_constant"):
        assert not [line for line in said if noise in line], noise
    assert [line for line in said if "max_steps=4" in line]  # the filters keep Lightning's other messages
    reference = logged_losses(straight)
    assert logged_losses(resumed) == {step: reference[step] for step in (2, 3)}


@pytest.mark.processes
def test_torchao_import_is_quiet_after_the_cli_filters():
    script = "import mistral_lightning.cli as cli\ncli.silence_known_noise()\nimport torchao.quantization\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "register_constant" not in result.stderr, result.stderr
