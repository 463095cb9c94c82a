"""Export to HF: `transformers` loads what `export` and `fit --export_hf_dir` write, and its logits match
the model that was trained; the export carries the source's tokenizer files and is readable by a server."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import mistral_common
import pytest
import torch
import transformers
import yaml
from helpers.training import datamodule, module, trainer
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file
from transformers import MistralForCausalLM

from mistral_lightning import Mistral, MistralConfig, generate
from mistral_lightning.checkpoint.hf import to_hf_name
from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint
from mistral_lightning.cli import main as cli_main
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


def test_export_notes_a_recorded_pretrained_folder_it_cannot_find(tmp_path, capsys):
    model, checkpoint = _training_checkpoint(tmp_path)
    saved = torch.load(checkpoint, weights_only=True)
    torch.save({**saved, "hyper_parameters": {"pretrained": "moved/away"}}, checkpoint)
    capsys.readouterr()
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    assert "records model.pretrained=moved/away, which is not a folder from here" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_export_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    code = cli_main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "hf")])
    assert code == 2
    error = capsys.readouterr().err
    assert "missing" in error and "Traceback" not in error
    assert not (tmp_path / "hf").exists()


# The files Mistral-7B-Instruct-v0.3's HF folder ships beside the weights, as the export must carry them.
TOKENIZER_FILES = [
    "tokenizer.model.v3",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
]


def _hf_source_folder(folder: Path) -> Path:
    """An HF folder as Mistral publishes v0.3: weights of the tiny fine-tune architecture (vocabulary 32768),
    mistral-common's v3 sentencepiece file, and the tokenizer.json, chat template and generation config
    that transformers writes for it."""
    model_config = yaml.safe_load((CONFIGS / "tiny" / "finetune.yaml").read_text())["model"]["model_config"]
    torch.manual_seed(0)
    Mistral(MistralConfig(**{**model_config, "vocab_size": 32768})).save_pretrained(
        folder, dtype=torch.float32
    )
    v3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    shutil.copyfile(v3, folder / "tokenizer.model.v3")
    # transformers converts a sentencepiece tokenizer.model into tokenizer.json; Mistral's folders hold both.
    spm_folder = folder.parent / "spm"
    spm_folder.mkdir()
    shutil.copyfile(v3, spm_folder / "tokenizer.model")
    tokenizer = transformers.LlamaTokenizer.from_pretrained(str(spm_folder.resolve()))
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    )
    tokenizer.save_pretrained(folder)
    (folder / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}\n')
    (folder / "generation_config.json").unlink()  # save_pretrained wrote one with our BOS/EOS ids
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*TOKENIZER_FILES, "config.json", "model.safetensors"]
    )
    return folder


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


def _fit_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_finetune_from_hf_folder_exports_a_folder_a_server_can_use(tmp_path, monkeypatch, caplog, capsys):
    """`fit --config configs/tiny/finetune.yaml` from an HF folder, on the demo data as `make demo` makes it,
    with `--export_hf_dir`: bf16 weights, the source's tokenizer files unchanged, readable by other users,
    loaded and generated from by transformers and mistral-common; a non-empty folder is refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    previous_umask = os.umask(0o022)
    try:
        source = _hf_source_folder(tmp_path / "Mistral-tiny-v0.3")
        assert (
            cli_main(["demo-data", "--out", "demo_output/raw", "--train-rows", "400", "--heldout-rows", "20"])
            == 0
        )
        preprocess = ["preprocess", "--input", "demo_output/raw/alpaca/train.parquet", "--tokenizer-model"]
        preprocess += [str(default_tokenizer_path()), "--output-prefix", "demo_output/data/alpaca"]
        assert cli_main([*preprocess, "--handler-name", "GeneralInstructionHandler", "--append-eod"]) == 0
        fit = ["fit", "--config", str(CONFIGS / "tiny" / "finetune.yaml"), "--trainer.max_steps", "3"]
        fit += ["--model.model_config", "null", "--model.pretrained", source.name]
        fit += ["--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"]
        with caplog.at_level("INFO"):
            assert cli_main([*fit, "--export_hf_dir", "hf_out"]) == 0
    finally:
        os.umask(previous_umask)
    assert "| Device | Model | Iterations | samples/s | tokens/s/p | s/step | memory/p |" in caplog.text
    out = Path("hf_out").resolve()

    # Weights: bf16 whatever the training precision (32-true here), equal to the last checkpoint's, cast.
    last = LightningCheckpoint("runs/tiny-finetune/checkpoints/last.ckpt")
    tensors = load_file(out / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    assert last.dtype == torch.float32
    for name in ("embed.weight", "layers.3.mlp.down.weight", "lm_head.weight"):
        assert torch.equal(tensors[to_hf_name(name)], last.read(name).to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # The source's tokenizer, chat-template and generation files, byte for byte.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*TOKENIZER_FILES, "config.json", "model.safetensors"]
    )
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    # Readable by a server running as another user: the umask's modes, not 0700/0600.
    assert _modes(out) == {".": 0o755, **{p.name: 0o644 for p in out.iterdir()}}

    # transformers loads the folder as it is and generates what our model generates from the same weights.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.dtype == torch.bfloat16  # as config.json names it
    hf_model = hf_model.float().eval()
    prompt = hf_tokenizer("Below is an instruction", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf_model.generate(prompt, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    ours = generate(Mistral.from_pretrained(out, torch.float32).eval(), prompt.tolist(), 6, eos_id=None)
    assert theirs[0, prompt.shape[1] :].tolist() == ours[0]
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 7  # the source's, as it was
    # mistral-common reads the exported tokenizer file as the v3 tokenizer of a 32768-token model.
    mistral = MistralTokenizer.from_file(str(out / "tokenizer.model.v3"))
    assert mistral.instruct_tokenizer.tokenizer.n_words == hf_model.config.vocab_size == 32768

    # `export` of the training checkpoint carries the same files, from the model.pretrained it records.
    assert (
        cli_main(["export", "--checkpoint", "runs/tiny-finetune/checkpoints/last.ckpt", "--out", "hf_2"]) == 0
    )
    for name in TOKENIZER_FILES:
        assert Path("hf_2", name).read_bytes() == (source / name).read_bytes(), name
    assert load_file("hf_2/model.safetensors")["lm_head.weight"].equal(tensors["lm_head.weight"])

    # A non-empty folder is refused before training, and what the user put there stays.
    Path("mine").mkdir()
    Path("mine/notes.txt").write_text("keep me")
    err = _fit_error(capsys, [*fit, "--export_hf_dir", "mine"])
    assert "--export_hf_dir mine: exists and is not empty" in err and "--export_hf_overwrite" in err
    err = _fit_error(capsys, [*fit, "--export_hf_dir", "mine", "--export_hf_overwrite", "true"])
    assert "notes.txt" in err and "refusing to replace it" in err
    assert [p.name for p in Path("mine").iterdir()] == ["notes.txt"]
    assert Path("mine/notes.txt").read_text() == "keep me"
    # Neither the current directory nor the model.pretrained folder, even with overwrite.
    assert "it is the current directory" in _fit_error(capsys, [*fit, "--export_hf_dir", "."])
    err = _fit_error(capsys, [*fit, "--export_hf_dir", source.name, "--export_hf_overwrite", "true"])
    assert "it is the model.pretrained folder" in err
    for name in TOKENIZER_FILES:
        assert (source / name).is_file()
