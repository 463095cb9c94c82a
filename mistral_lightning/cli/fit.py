"""`mistral-lightning fit|validate|test|predict`: LightningCLI over MistralLightningModule and the DataModules.

The model section takes MistralLightningModule's arguments; `data` names a DataModule by
`class_path` or short name (PretrainDataModule, InstructionDataModule or PreferenceDataModule); `trainer` is
Lightning's Trainer, with ModelParallelStrategy (or the NPU variant) for the (data_parallel, tensor_parallel) mesh.
`fit --export_hf_dir DIR` also writes the final weights as an HF folder, through the writer `export` uses.
The optimizer is AdamW and its schedule is built once the model exists (`model.optimizer.*`,
`model.schedule.*`), so LightningCLI's own `--optimizer`/`--lr_scheduler` are left out of the parser.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

import mistral_lightning.callbacks  # noqa: F401  (imported, its callbacks resolve by short name)
import mistral_lightning.data.datamodules  # noqa: F401  (imported, its DataModules resolve by short name)
import mistral_lightning.training.npu  # noqa: F401  (registers the "npu" accelerator for trainer.accelerator)
from mistral_lightning.adapters.merge import trained_weights
from mistral_lightning.checkpoint.hf import HF_OUTPUT, save_hf
from mistral_lightning.checkpoint.tokenizer_files import scratch_tokenizer
from mistral_lightning.cli.configs import resolve_config_argv
from mistral_lightning.cli.options import add_trust_checkpoint
from mistral_lightning.config import parse_dtype
from mistral_lightning.errors import UserError
from mistral_lightning.outputs import OutputTarget, check_output_folder, probe_writable, user_path
from mistral_lightning.training.module import MistralLightningModule
from mistral_lightning.training.npu import check_npu_accelerator
from mistral_lightning.training.strategy import prepare_checkpoint_loading, use_safe_strategy

# LightningCLI's optimizer options, which would build the optimizer before configure_model creates the weights.
OPTIMIZER_OPTIONS = ("--optimizer", "--lr_scheduler")


class TrainerSettingError(UserError):
    """A trainer setting this machine or environment cannot honour."""


def refuse_optimizer_options(argv: list[str]) -> None:
    for argument in argv:
        option = re.split(r"[=.]", argument, maxsplit=1)[0]
        if option in OPTIMIZER_OPTIONS:
            raise UserError(
                f"{option} is not an option here: the optimizer is AdamW, built after the model exists; set it "
                "with model.optimizer.* (lr, weight_decay, betas, eps) and its schedule with model.schedule.* "
                "(kind, warmup_fraction, min_lr), e.g. --model.optimizer.lr 1e-4"
            )


def _config_key_of(settings: Any, class_path: str, prefix: str = "") -> str | None:
    """The dotted config key whose value (or list item) names `class_path`, e.g. trainer.logger."""
    if isinstance(settings, dict):
        if settings.get("class_path") == class_path:
            return prefix.rstrip(".")
        for key, value in settings.items():
            found = _config_key_of(value, class_path, f"{prefix}{key}.")
            if found:
                return found
    if isinstance(settings, list):
        for item in settings:
            found = _config_key_of(item, class_path, prefix)
            if found:
                return found
    return None


def missing_package_error(err: BaseException, settings: Any) -> TrainerSettingError | None:
    """One line for a class of the config (a logger, a callback) whose package is not installed, from the
    ModuleNotFoundError jsonargparse wraps while instantiating it; None for any other error."""
    class_path = None
    while err is not None:
        if isinstance(err, ModuleNotFoundError):
            short = class_path.rsplit(".", 1)[-1] if class_path else "a class of the config"
            key = _config_key_of(settings.as_dict(), class_path) if class_path else None
            return TrainerSettingError(
                f"{key or 'the config'} {short} cannot start: {' '.join(str(err).split())}"
            )
        found = re.search(r"Problem with given class_path '([\w.]+)'", str(err))
        class_path = found.group(1) if found else class_path
        err = err.__cause__ or err.__context__
    return None


def _settings_check(err: BaseException | None) -> UserError | None:
    """The one-line UserError of a settings group's own check (e.g. model.lora's), which jsonargparse wraps in a
    ValueError listing every Union member it tried; None if there is none."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__ or err.__context__
    return err


class MistralCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Every parser built on this one (fit's, plan's) leaves out the optimizer options (OPTIMIZER_OPTIONS).
        super().__init__(*args, auto_configure_optimizers=False, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--export_hf_dir",
            type=str | None,
            default=None,
            help="fit only: after training, write the weights as an HF folder a server can use as it is "
            "(config.json, safetensors, and the tokenizer files of model.pretrained) here",
        )
        parser.add_argument(
            "--export_hf_dtype",
            type=str,
            default="bfloat16",
            help="dtype of the --export_hf_dir weights, whatever the training precision (bf16/fp16/fp32)",
        )
        parser.add_argument(
            "--export_hf_overwrite",
            type=bool,
            default=False,
            help="replace an --export_hf_dir that holds a previous HF export (and nothing else)",
        )
        add_trust_checkpoint(parser, "--ckpt_path")

    def instantiate_classes(self) -> None:
        settings = self.config[self.subcommand]
        # A `~` the shell left (in a YAML file, or after `=`) means the home folder, as in every other option.
        for key in ("ckpt_path", "trainer.default_root_dir", "model.pretrained"):
            if isinstance(settings.get(key), str):
                settings[key] = user_path(settings[key])
        # Checkpoints are written and read through DeviceModelParallelStrategy, whatever the config names.
        use_safe_strategy(settings)
        check_npu_accelerator(settings.trainer.accelerator)
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:  # Lightning's word on a trainer setting, e.g. a missing GPU
            raise TrainerSettingError(f"trainer: {' '.join(str(err).split())}") from err
        except ValueError as err:
            missing = missing_package_error(err, settings) or _settings_check(err)
            if missing is None:
                raise
            raise missing from err
        prepare_checkpoint_loading(self.trainer, self.config_init[self.subcommand])

    def _export_target(self) -> OutputTarget | None:
        """Where `--export_hf_dir` goes; the run's inputs and checkpoints are never replaced by it."""
        settings = self.config[self.subcommand]
        if self.subcommand != "fit" or not settings.get("export_hf_dir"):
            return None
        checkpoint_folders = {
            f"the checkpoint folder of callback {type(callback).__name__}": callback.dirpath
            for callback in self.trainer.checkpoint_callbacks
            if getattr(callback, "dirpath", None)
        }
        return OutputTarget(
            Path(settings["export_hf_dir"]),
            option="--export_hf_dir",
            overwrite=bool(settings.get("export_hf_overwrite")),
            overwrite_option="--export_hf_overwrite true",
            protected={
                "the model.pretrained folder": self.model.hparams.get("pretrained"),
                "trainer.default_root_dir": self.trainer.default_root_dir,
                **checkpoint_folders,
            },
        )

    def before_fit(self) -> None:
        # Refuse a bad --export_hf_dir or dtype now, not after the training it would have ended.
        target = self._export_target()
        if target is not None:
            parse_dtype(self.config[self.subcommand]["export_hf_dtype"])
            check_output_folder(target, HF_OUTPUT)
            probe_writable(target.path.parent, target)

    def after_fit(self) -> None:
        target = self._export_target()
        if target is not None and self.trainer.state.status == "finished":
            pretrained = self.model.hparams.get("pretrained")
            # Trained from scratch, the run records no tokenizer: the export gets the one every command assumes.
            files_from = pretrained or scratch_tokenizer(self.model.config)
            # Every rank takes part in gathering the shards; only global rank 0 writes.
            save_hf(
                trained_weights(self.model.model, self.model.lora_config, pretrained),
                target,
                dtype=parse_dtype(self.config[self.subcommand]["export_hf_dtype"]),
                is_writer=self.trainer.is_global_zero,
                files_from=files_from,
            )
            self.trainer.strategy.barrier()


def main(argv: list[str]) -> int:
    """argv starts with the LightningCLI subcommand (fit, validate, test or predict)."""
    # The `mistral-lightning` dispatcher hands over its own argv; Lightning would warn that sys.argv differs.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    refuse_optimizer_options(argv)
    argv = resolve_config_argv(argv)  # --config tiny/finetune: a config shipped in the package
    MistralCLI(
        MistralLightningModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )
    return 0
