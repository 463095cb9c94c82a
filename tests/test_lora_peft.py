"""LoRA adapters in Hugging Face PEFT's format, merged exports and base + adapter inference, each checked against
PEFT itself (`PeftModel` on transformers' MistralForCausalLM): its logits, its `merge_and_unload()` and its greedy
generate. A PEFT folder loads as PEFT reads it (its `target_modules`, as names or a regular expression) or is
refused in one line naming the setting that cannot be honoured."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from helpers.models import adapted
from helpers.processes import run_on_ranks
from helpers.training import write_instruction_data
from safetensors.torch import load_file, save_file

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.adapters.lora import LoRAConfig, is_adapter_parameter
from mistral_lightning.adapters.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    load_peft_adapter,
    save_peft_adapter,
)
from mistral_lightning.checkpoint.integrity import LIGHTNING_METADATA
from mistral_lightning.cli import main as cli_main
from mistral_lightning.config import parameter_shapes
from mistral_lightning.generation.loading import load_model

LORA_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "lora.yaml"
IDS = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
DEFAULT = LoRAConfig(rank=4, alpha=8.0)
EVERY_LINEAR = LoRAConfig(rank=2, alpha=3.0, targets=("q", "k", "v", "o", "gate", "up", "down", "lm_head"))


def tiny_model(**fields) -> Mistral:
    # Large weights make greedy decoding depend on every weight, so a wrong merge changes the tokens.
    model = Mistral(MistralConfig.from_name("tiny", initializer_range=0.2, **fields))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Our tiny model and its HF folder (fp32), the base every adapter here goes onto."""
    model = tiny_model()
    return model, model.save_pretrained(tmp_path_factory.mktemp("base"), dtype=torch.float32)


# PEFT and transformers are imported where used: the tensor-parallel workers import this module and need neither.
def hf_model(folder):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(folder, dtype=torch.float32)


def peft_model(folder, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(folder), adapter).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def lora_fit_checkpoint(path, model: Mistral, lora: LoRAConfig, pretrained) -> None:
    """What a LoRA `fit` saves, a DCP folder or (`path` ending in .ckpt) one file: the adapters alone,
    model.pretrained and model.lora recorded."""
    state = {
        f"model.{name}": p.detach() for name, p in model.named_parameters() if is_adapter_parameter(name)
    }
    hyper_parameters = {"pretrained": str(pretrained), "lora": dataclasses.asdict(lora)}
    metadata = {"hyper_parameters": hyper_parameters, "mistral_config": dataclasses.asdict(model.config)}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state, **metadata}, path)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"state_dict": state}, checkpoint_id=path, no_dist=True)
    torch.save(metadata, path / LIGHTNING_METADATA)


@pytest.mark.parametrize("lora", [DEFAULT, EVERY_LINEAR], ids=["default", "every-linear"])
def test_our_adapter_loads_in_peft_and_gives_our_logits(base, tmp_path, lora):
    model, folder = base
    ours = adapted(model, lora)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    theirs = peft_model(folder, tmp_path / "adapter")
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(model), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)


PEFT_MADE = LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "down", "lm_head"))


def peft_made_adapter(folder, out) -> torch.Tensor:
    """An adapter made and saved by PEFT itself over the HF `folder` (random nonzero A and B); its logits."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    theirs = get_peft_model(hf_model(folder), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    theirs.save_pretrained(out)  # also saves the targeted lm_head's own weight
    return logits(theirs.eval())


def test_a_peft_made_adapter_loads_onto_our_model_and_merged_for_inference(base, tmp_path):
    model, folder = base
    expected = peft_made_adapter(folder, tmp_path / "peft")
    assert not torch.allclose(expected, logits(model), atol=1e-3)

    ours = copy.deepcopy(model)
    lora = load_peft_adapter(ours, tmp_path / "peft")
    assert lora == PEFT_MADE
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    merged = load_model(folder, adapter=tmp_path / "peft")
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)


def _edited(source: Path, out: Path, change_config=None, change_tensors=None) -> Path:
    """A copy of the PEFT folder `source` with its adapter_config.json or tensors changed."""
    shutil.copytree(source, out)
    if change_config is not None:
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        change_config(config)
        (out / ADAPTER_CONFIG).write_text(json.dumps(config))
    if change_tensors is not None:
        tensors = load_file(out / ADAPTER_WEIGHTS)
        change_tensors(tensors)
        save_file(tensors, out / ADAPTER_WEIGHTS)
    return out


@pytest.fixture(scope="module")
def peft_made(base, tmp_path_factory) -> Path:
    """peft_made_adapter's folder, made once for the tests that change it."""
    adapter = tmp_path_factory.mktemp("peft_made") / "adapter"
    peft_made_adapter(base[1], adapter)
    return adapter


@pytest.mark.parametrize("targets", ["regular-expression", "all-linear"])
def test_target_modules_load_as_peft_reads_them(base, peft_made, tmp_path, targets):
    """PEFT's adapter with its target_modules as a regular expression; ours on every linear layer but the LM
    head with target_modules "all-linear": each on our model gives PEFT's logits."""
    model, folder = base
    if targets == "all-linear":
        save_peft_adapter(
            adapted(model, LoRAConfig(rank=2, alpha=3.0, targets="all-linear")), tmp_path / "saved"
        )
        adapter = _edited(tmp_path / "saved", tmp_path / targets, _set("target_modules", "all-linear"))
    else:
        pattern = r"model\.layers\.\d+\.(self_attn\.[qv]_proj|mlp\.down_proj)|lm_head"
        adapter = _edited(peft_made, tmp_path / targets, _set("target_modules", pattern))
    ours = copy.deepcopy(model)
    load_peft_adapter(ours, adapter)
    expected = logits(peft_model(folder, adapter))
    assert not torch.allclose(expected, logits(model), atol=1e-3)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)


def _set(key, value):
    return lambda config: config.update({key: value})


def _add_base_layer(tensors) -> None:
    # k_proj is not a target, so PEFT leaves its weight alone; loading this would replace the base's k.
    shape = parameter_shapes(MistralConfig.from_name("tiny"))["layers.0.attn.k.weight"]
    tensors["base_model.model.model.layers.0.self_attn.k_proj.base_layer.weight"] = torch.zeros(shape)


REFUSED = {
    # PEFT puts no adapter on v_proj, so it ignores the v_proj tensors the file still holds.
    "target_modules": (
        {"change_config": _set("target_modules", ["q_proj", "down_proj", "lm_head"])},
        "v_proj",
    ),
    "target_modules-some-layers": (
        {"change_config": _set("target_modules", r"model\.layers\.0\.self_attn\.q_proj")},
        "selects 1 of the 2 'q' layers",
    ),
    "alora_invocation_tokens": ({"change_config": _set("alora_invocation_tokens", [5, 6])}, "[5, 6]"),
    "base_layer": ({"change_tensors": _add_base_layer}, "k_proj.base_layer.weight"),
    "lora_alpha": ({"change_config": _set("lora_alpha", float("nan"))}, "nan"),
    "init_lora_weights": ({"change_config": _set("init_lora_weights", "pissa")}, "pissa"),
}


@pytest.mark.parametrize("setting", list(REFUSED))
def test_a_peft_setting_not_honoured_here_is_refused_in_one_line_naming_it(
    base, peft_made, tmp_path, setting
):
    changes, detail = REFUSED[setting]
    adapter = _edited(peft_made, tmp_path / "adapter", **changes)
    with pytest.raises(AdapterError) as refused:
        load_peft_adapter(copy.deepcopy(base[0]), adapter)
    message = str(refused.value)
    named = "target_modules" if setting.startswith("target_modules") or setting == "base_layer" else setting
    assert "\n" not in message and named in message and detail in message, message


def _adapter_under_tensor_parallelism(folder, adapter, out, expected_file) -> float:
    """Greatest difference between this rank's logits and PEFT's (returned small: run_on_ranks collects
    results after the workers exit, which a large one would block)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from mistral_lightning.adapters.lora import WithoutAdapters
    from mistral_lightning.checkpoint.hf import load_hf_weights
    from mistral_lightning.training.parallel import parallelize

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with torch.device("meta"):
        model = Mistral(MistralConfig.from_hf(folder))
    parallelize(model, mesh, sequence_parallel=False, lora=PEFT_MADE)
    model.to_empty(device="cpu")
    load_hf_weights(WithoutAdapters(model), folder)
    load_peft_adapter(model, adapter)
    save_peft_adapter(model, out, is_writer=torch.distributed.get_rank() == 0)
    result = logits(model.eval())
    result = result.full_tensor() if isinstance(result, DTensor) else result
    return float((result - torch.load(expected_file)).abs().max())


@pytest.mark.processes
def test_a_peft_adapter_loads_and_saves_under_tensor_parallelism(base, tmp_path):
    """Each TP rank fills its shard of the adapters (B by rows for q/v/lm_head, A by columns for down)."""
    _, folder = base
    torch.save(peft_made_adapter(folder, tmp_path / "peft"), tmp_path / "expected.pt")
    args = (folder, tmp_path / "peft", tmp_path / "saved", tmp_path / "expected.pt")
    # 1e-4: the row-parallel layers sum their two halves in another order than one process does.
    assert max(run_on_ranks(_adapter_under_tensor_parallelism, *args, timeout=300)) < 1e-4
    saved = load_file(tmp_path / "saved" / ADAPTER_WEIGHTS)
    original = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS)
    assert saved.keys() == {name for name in original if ".lora_" in name}
    assert all(torch.equal(tensor, original[name]) for name, tensor in saved.items())


@pytest.mark.parametrize("form", ["dcp-folder", "last.ckpt"])
def test_lora_checkpoint_exports_merged_as_peft_merges_and_as_a_peft_folder(base, tmp_path, form):
    model, folder = base
    ours = adapted(model, EVERY_LINEAR)
    checkpoint = tmp_path / form
    lora_fit_checkpoint(checkpoint, ours, EVERY_LINEAR, folder)
    peft_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    export = ["export", "--checkpoint", str(checkpoint), "--dtype", "float32"]
    assert cli_main([*export, "--out", str(peft_dir), "--lora-format", "peft"]) == 0
    assert cli_main([*export, "--out", str(merged_dir)]) == 0

    theirs = peft_model(folder, peft_dir)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    reference = theirs.merge_and_unload().state_dict()
    exported = load_file(merged_dir / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6, msg=name)
    assert json.loads((peft_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(
        folder.resolve()
    )


def test_generate_with_an_adapter_equals_the_merged_export_and_peft(
    base, tmp_path, tokenizer, tokenizer_path, capsys
):
    model, folder = base
    ours = adapted(model, DEFAULT, seed=3)
    checkpoint = tmp_path / "lora-checkpoint"
    lora_fit_checkpoint(checkpoint, ours, DEFAULT, folder)
    export = ["export", "--checkpoint", str(checkpoint), "--dtype", "float32"]
    assert cli_main([*export, "--out", str(tmp_path / "peft"), "--lora-format", "peft"]) == 0
    assert cli_main([*export, "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()

    prompt = "The capital of France is"
    options = ["--tokenizer", tokenizer_path, "--max-new-tokens", "6", "--prompt", prompt]
    outputs = []
    for source in (
        ["--checkpoint", str(folder), "--adapter", str(tmp_path / "peft")],
        ["--checkpoint", str(tmp_path / "merged")],
        ["--checkpoint", str(checkpoint)],  # the LoRA checkpoint alone: its recorded base + its adapters
    ):
        assert cli_main(["generate", *source, *options]) == 0
        outputs.append(capsys.readouterr().out)
    ids = tokenizer.encode(prompt, bos=True)
    reference = peft_model(folder, tmp_path / "peft").generate(
        torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_id, pad_token_id=0
    )[0, len(ids) :]
    expected = tokenizer.decode([t for t in reference.tolist() if t != tokenizer.eos_id]) + "\n"
    base_output = ["generate", "--checkpoint", str(folder), *options]
    assert cli_main(base_output) == 0
    assert capsys.readouterr().out != expected  # the adapter changes the completion
    assert outputs == [expected] * 3


def test_bad_adapters_get_one_line(base, tmp_path, capsys):
    model, folder = base
    other = adapted(tiny_model(hidden_size=32), DEFAULT)
    save_peft_adapter(other, tmp_path / "other")
    with pytest.raises(
        AdapterError, match=r"lora_A.weight' has shape \[4, 32\] but the base model needs \[4, 64\]"
    ):
        load_peft_adapter(copy.deepcopy(model), tmp_path / "other")

    (tmp_path / "empty").mkdir()
    for adapter, message in [
        ("other", "has shape [4, 32] but the base model needs [4, 64]"),
        ("empty", f"no {ADAPTER_CONFIG}, so not a PEFT adapter folder"),
    ]:
        argv = [
            "generate",
            "--checkpoint",
            str(folder),
            "--adapter",
            str(tmp_path / adapter),
            "--prompt",
            "x",
        ]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    checkpoint = tmp_path / "lora-checkpoint"
    lora_fit_checkpoint(checkpoint, adapted(model, DEFAULT), DEFAULT, tmp_path / "moved-away")
    for argv, message in [
        (
            ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")],
            "which is not a folder from here",
        ),
        (
            ["convert", "--loader", "lightning", "--saver", "hf", "--load-dir", str(checkpoint)]
            + ["--save-dir", str(tmp_path / "out")],
            "holding only the adapters",
        ),
        (
            [
                "generate",
                "--checkpoint",
                str(checkpoint),
                "--adapter",
                str(tmp_path / "other"),
                "--prompt",
                "x",
            ],
            "would stack a second one",
        ),
    ]:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_fit_with_lora_then_export_loads_in_peft_and_transformers(
    tmp_path, monkeypatch, tokenizer_path, capsys
):
    """End to end through the CLI: `fit --config configs/tiny/lora.yaml` over an HF base (2 steps) ->
    `export --lora-format peft` -> PEFT gives the logits of our model loaded from the checkpoint; `export`
    (merged) -> transformers gives them too."""
    monkeypatch.chdir(tmp_path)  # the config's runs/ folder goes here
    config = yaml.safe_load(LORA_CONFIG.read_text())
    base_model = Mistral(MistralConfig(**config["model"]["model_config"], initializer_range=0.2))
    base_model.init_weights(torch.Generator().manual_seed(0))
    folder = base_model.eval().save_pretrained(tmp_path / "base", dtype=torch.float32)
    data = write_instruction_data(str(tmp_path / "sft"), [(5, 20)] * 8)
    checkpoints = tmp_path / "checkpoints"
    fit = ["fit", "--config", str(LORA_CONFIG), "--model.pretrained", str(folder), "--trainer.max_steps", "2"]
    fit += [
        "--trainer.limit_val_batches",
        "0",
        "--data.init_args.data_prefix",
        data,
        "--data.init_args.split",
        "1,0,0",
    ]
    fit += ["--data.init_args.seq_length", "32", "--data.init_args.micro_batch_size", "2"]
    fit += ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={checkpoints}"]
    fit += ["--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.filename={step}"]
    fit += ["--export_hf_dir", str(tmp_path / "fit_export"), "--export_hf_dtype", "float32"]
    assert cli_main(fit) == 0
    checkpoint = checkpoints / "step=2.ckpt"
    export = ["export", "--checkpoint", str(checkpoint), "--dtype", "float32"]
    assert cli_main([*export, "--out", str(tmp_path / "peft"), "--lora-format", "peft"]) == 0
    assert cli_main([*export, "--out", str(tmp_path / "merged")]) == 0

    ours = logits(load_model(checkpoint))
    expected = logits(peft_model(folder, tmp_path / "peft"))
    assert (expected - logits(base_model)).abs().max() > 1e-4  # two steps moved the adapters off B = 0
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    # Merged weights round in another order than PEFT's separate adapter path, hence 1e-4.
    torch.testing.assert_close(logits(hf_model(tmp_path / "merged").eval()), expected, rtol=1e-4, atol=1e-4)
    # fit --export_hf_dir merges the adapters too (it wrote the bare base before).
    torch.testing.assert_close(
        logits(hf_model(tmp_path / "fit_export").eval()), expected, rtol=1e-4, atol=1e-4
    )

    # predict --ckpt_path with the LoRA checkpoint runs the adapters unmerged: the same greedy text as generate.
    prompts, completions = tmp_path / "prompts.jsonl", tmp_path / "completions.jsonl"
    prompts.write_text('{"prompt": "The capital of France is"}\n')
    predict = ["predict", "--config", str(LORA_CONFIG), "--model.pretrained", str(folder)]
    predict += ["--ckpt_path", str(checkpoint)]
    predict += ["--model.parallel.sequence_parallel", "false", "--model.max_new_tokens", "6"]
    predict += ["--data", "mistral_lightning.generation.predict_data.PromptsDataModule"]
    predict += ["--data.prompts_file", str(prompts), "--data.tokenizer_model", tokenizer_path]
    predict += ["--trainer.callbacks+=mistral_lightning.generation.predict_writer.JsonlPredictionWriter"]
    predict += [f"--trainer.callbacks.output_file={completions}"]
    assert cli_main(predict) == 0
    capsys.readouterr()
    generate = ["generate", "--checkpoint", str(checkpoint), "--tokenizer", tokenizer_path]
    assert cli_main([*generate, "--max-new-tokens", "6", "--prompt", "The capital of France is"]) == 0
    completion = json.loads(completions.read_text())["completion"]
    assert completion + "\n" == capsys.readouterr().out
