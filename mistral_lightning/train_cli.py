"""`mistral-lightning fit|validate|test|predict`: LightningCLI over MistralLightningModule and the DataModules.

The model section takes MistralLightningModule's arguments; `data` names a DataModule by
`class_path` (PretrainDataModule or InstructionDataModule); `trainer` is Lightning's Trainer, with
ModelParallelStrategy (or the NPU variant) for the (data_parallel, tensor_parallel) mesh.
`fit --export_hf_dir DIR` also writes the final weights as an HF folder.
"""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI

import mistral_lightning.npu  # noqa: F401  (registers the "npu" accelerator for trainer.accelerator)
from mistral_lightning.lightning_module import MistralLightningModule


class MistralCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--export_hf_dir",
            type=str | None,
            default=None,
            help="fit only: after training, write the weights as an HF folder (config.json + safetensors) here",
        )

    def after_fit(self) -> None:
        out_dir = self.config[self.subcommand].get("export_hf_dir")
        if out_dir and self.trainer.state.status == "finished":
            # Every rank takes part in gathering the shards; only global rank 0 writes.
            self.model.model.save_pretrained(out_dir, is_writer=self.trainer.is_global_zero)
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
