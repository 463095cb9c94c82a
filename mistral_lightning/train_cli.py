"""`mistral-lightning fit|validate|test|predict`: LightningCLI over MistralLightningModule and the DataModules.

The model section takes MistralLightningModule's arguments; `data` names a DataModule by
`class_path` (PretrainDataModule or InstructionDataModule); `trainer` is Lightning's Trainer, with
ModelParallelStrategy (or the NPU variant) for the (data_parallel, tensor_parallel) mesh.
`fit --export_hf_dir DIR` also writes the final weights as an HF folder, through the writer `export` uses.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

import mistral_lightning.npu  # noqa: F401  (registers the "npu" accelerator for trainer.accelerator)
from mistral_lightning.checkpoint.base import ModelWeights
from mistral_lightning.checkpoint.hf import HF_OUTPUT, save_hf
from mistral_lightning.config import parse_dtype
from mistral_lightning.lightning_module import MistralLightningModule
from mistral_lightning.outputs import OutputTarget, check_output_folder, probe_writable
from mistral_lightning.strategy import prepare_checkpoint_loading, use_safe_strategy


class MistralCLI(LightningCLI):
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
        parser.add_argument(
            "--trust-checkpoint",
            action="store_true",
            help="load --ckpt_path with full unpickling, running any code it holds (only checkpoints you trust)",
        )

    def instantiate_classes(self) -> None:
        # Checkpoints are written and read through SafeModelParallelStrategy, whatever the config names.
        use_safe_strategy(self.config[self.subcommand])
        super().instantiate_classes()
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
            # Every rank takes part in gathering the shards; only global rank 0 writes.
            save_hf(
                ModelWeights(self.model.model),
                target,
                dtype=parse_dtype(self.config[self.subcommand]["export_hf_dtype"]),
                is_writer=self.trainer.is_global_zero,
                files_from=self.model.hparams.get("pretrained"),
            )
            self.trainer.strategy.barrier()


def main(argv: list[str]) -> int:
    """argv starts with the LightningCLI subcommand (fit, validate, test or predict)."""
    # The `mistral-lightning` dispatcher hands over its own argv; Lightning would warn that sys.argv differs.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    MistralCLI(
        MistralLightningModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )
    return 0
