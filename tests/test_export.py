"""Export to HF: `transformers` loads what `export` and `fit --export_hf_dir` write, and its logits match
the model that was trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_utils import datamodule, module, single_thread, toy_data, trainer  # noqa: F401
from transformers import MistralForCausalLM

from mistral_lightning.cli import main as cli_main
from mistral_lightning.generation.loading import load_model as load_trained_model
from mistral_lightning.tokenizer import default_tokenizer_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = MistralForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def _ids() -> torch.Tensor:
    return torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("distributed", [True, False], ids=["dcp_folder", "single_file"])
def test_fit_then_export_loads_in_transformers(toy_data, single_thread, tmp_path, distributed):  # noqa: F811
    trained = module()
    fit_trainer = trainer(tmp_path, max_steps=2, checkpoint_every=2, distributed_checkpoint=distributed)
    fit_trainer.fit(trained, datamodule=datamodule(toy_data))
    checkpoint = tmp_path / "checkpoints" / "step=2.ckpt"
    assert checkpoint.is_dir() == distributed
    out = tmp_path / "hf"
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "float32"]) == 0
    with torch.no_grad():
        expected = trained.model(_ids())
    torch.testing.assert_close(_hf_logits(out, _ids()), expected, rtol=1e-4, atol=1e-4)


def test_export_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    code = cli_main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "hf")])
    assert code == 2
    error = capsys.readouterr().err
    assert "missing" in error and "Traceback" not in error
    assert not (tmp_path / "hf").exists()


def test_cli_fit_tiny_finetune_config_end_to_end(tmp_path, monkeypatch, caplog):
    """`fit --config configs/tiny/finetune.yaml` on the demo data, as `make demo` runs it, with HF export."""
    monkeypatch.chdir(tmp_path)
    assert (
        cli_main(["demo-data", "--out", "demo_output/raw", "--train-rows", "400", "--heldout-rows", "20"])
        == 0
    )
    preprocess = ["preprocess", "--input", "demo_output/raw/alpaca/train.parquet", "--tokenizer-model"]
    preprocess += [str(default_tokenizer_path()), "--output-prefix", "demo_output/data/alpaca"]
    assert cli_main([*preprocess, "--handler-name", "GeneralInstructionHandler", "--append-eod"]) == 0
    fit = ["fit", "--config", str(CONFIGS / "tiny" / "finetune.yaml"), "--trainer.max_steps", "3"]
    fit += [
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--export_hf_dir",
        "hf_out",
    ]
    with caplog.at_level("INFO"):
        assert cli_main(fit) == 0
    assert "| Device | Model | Iterations | samples/s | tokens/s/p | s/step | memory/p |" in caplog.text
    assert "| 1 x CPU | Mistral-9M | 3 |" in caplog.text
    # The HF folder written at the end of fit holds the weights of the last checkpoint.
    last = load_trained_model("runs/tiny-finetune/checkpoints/last.ckpt")
    with torch.no_grad():
        expected = last(_ids())
    torch.testing.assert_close(_hf_logits(Path("hf_out"), _ids()), expected, rtol=1e-4, atol=1e-4)
