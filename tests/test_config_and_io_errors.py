"""MistralConfig presets and validation, and clear errors for bad checkpoints and options."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.checkpoint.hf import CheckpointError
from mistral_lightning.cli.options import add_model_arguments
from mistral_lightning.config import ConfigError, parameter_shapes, parse_dtype, resolve_model_config
from mistral_lightning.generation.loading import load_model


def test_presets_follow_the_published_configs():
    v01 = MistralConfig.from_name("mistral-7b-v0.1")
    v02 = MistralConfig.from_name("mistral-7b-instruct-v0.2")
    recipe = MistralConfig.from_name("mistral-7b-32k")
    assert (v01.rope_theta, v01.sliding_window) == (1e4, 4096)
    assert (v02.rope_theta, v02.sliding_window) == (1e6, None)
    assert (recipe.rope_theta, recipe.sliding_window, recipe.max_seq_length) == (1e6, 4096, 32768)
    # Cross-check the parameter count against transformers' own model built on the meta device.
    with torch.device("meta"):
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**v01.to_hf_dict()))
    assert v01.num_params == sum(p.numel() for p in hf.parameters()) == 7_241_732_096


def test_hf_config_round_trip_through_transformers(tmp_path):
    config = MistralConfig.from_name("mistral-7b-32k")
    transformers.MistralConfig(**config.to_hf_dict()).save_pretrained(tmp_path)
    assert MistralConfig.from_hf(tmp_path) == config
    assert MistralConfig.from_hf(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_heads": 6, "num_kv_heads": 4}, "divisible by num_kv_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_invalid_config_is_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        MistralConfig.from_name("tiny", **changes)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown model preset 'mistral-9b'.*tiny"):
        MistralConfig.from_name("mistral-9b")


def test_missing_config_json_names_the_folder(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}.*config.json"):
        Mistral.from_pretrained(tmp_path)


def saved_tiny(tmp_path):
    config = MistralConfig.from_name("tiny", vocab_size=64)
    return Mistral(config).save_pretrained(tmp_path / "hf")


def test_folder_without_weights(tmp_path):
    folder = saved_tiny(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        Mistral.from_pretrained(folder)


def test_missing_tensor_is_named(tmp_path):
    folder = saved_tiny(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        Mistral.from_pretrained(folder)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    folder = saved_tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"gate_proj.weight' has shape \[192, 64\].*expects \[100, 64\]"
    ):
        Mistral.from_pretrained(folder)


@pytest.mark.processes
def test_cli_reports_user_errors_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "mistral_lightning", "no-such-command"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown command 'no-such-command'" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- one dtype table, one config resolver

DTYPE_SPELLINGS = [
    ("fp32", torch.float32),
    ("float32", torch.float32),
    ("bf16", torch.bfloat16),
    ("bfloat16", torch.bfloat16),
    ("fp16", torch.float16),
    ("float16", torch.float16),
]


@pytest.mark.parametrize(("name", "dtype"), DTYPE_SPELLINGS)
def test_both_dtype_spellings_parse(name, dtype):
    assert parse_dtype(name) is dtype


def test_unknown_dtype_names_every_accepted_spelling():
    with pytest.raises(ConfigError, match="'half'.*fp32/float32, bf16/bfloat16, fp16/float16"):
        parse_dtype("half")


@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("float16", torch.float16)])
def test_inference_commands_take_both_dtype_spellings(tmp_path, name, dtype):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(saved_tiny(tmp_path)), "--dtype", name])
    assert load_model(args.checkpoint, dtype=args.dtype).embed.weight.dtype == dtype


def test_parameter_shapes_follow_the_model():
    config = MistralConfig.from_name("tiny", num_kv_heads=1, intermediate_size=100)
    model = Mistral(config)
    assert parameter_shapes(config) == {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert list(parameter_shapes(config)) == [name for name, _ in model.named_parameters()]


def test_model_config_from_a_preset_a_folder_or_the_pretrained_folder(tmp_path):
    folder = saved_tiny(tmp_path)
    tiny_64 = MistralConfig.from_name("tiny", vocab_size=64)
    assert resolve_model_config("tiny") == MistralConfig.from_name("tiny")
    assert resolve_model_config(str(folder)) == tiny_64
    assert resolve_model_config(folder / "config.json") == tiny_64
    assert resolve_model_config(None, folder) == tiny_64
    assert resolve_model_config({"vocab_size": 64, "num_layers": 1}).num_layers == 1
    with pytest.raises(ConfigError, match="'mistral-9b': neither a preset.*tiny"):
        resolve_model_config("mistral-9b")
    with pytest.raises(ConfigError, match="vocab_size: 32000 vs 64"):
        resolve_model_config("tiny", folder)
    with pytest.raises(ConfigError, match="model.pretrained"):
        resolve_model_config(None, None)
