"""Export to HF: `transformers` loads what `export` and `fit --export_hf_dir` write, and its logits match
the model that was trained."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_utils import datamodule, module, trainer
from transformers import MistralForCausalLM

from mistral_lightning import Mistral, MistralConfig
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
def test_fit_then_export_loads_in_transformers(toy_data, single_thread, tmp_path, distributed):
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


def _training_checkpoint(tmp_path: Path) -> tuple[Mistral, Path]:
    """A single-file checkpoint as `fit` writes it, without training."""
    model = Mistral(MistralConfig.from_name("tiny", vocab_size=64))
    state = {f"model.{key}": tensor for key, tensor in model.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "mistral_config": dataclasses.asdict(model.config)}, path)
    return model, path


@pytest.mark.parametrize(
    ("dtype_option", "dtype"),
    [([], torch.bfloat16), (["--dtype", "bf16"], torch.bfloat16), (["--dtype", "fp32"], torch.float32)]
    + [(["--dtype", "float32"], torch.float32), (["--dtype", "float16"], torch.float16)],
    ids=["default", "bf16", "fp32", "float32", "float16"],
)
def test_export_dtype_takes_both_spellings(tmp_path, dtype_option, dtype):
    model, checkpoint = _training_checkpoint(tmp_path)
    out = tmp_path / "hf"
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *dtype_option]) == 0
    tensors = load_file(out / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {dtype}
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight.detach().to(dtype))


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
