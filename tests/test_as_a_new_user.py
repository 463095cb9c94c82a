"""What a new user meets after training from scratch (issue 25): the export carries the tokenizer the
run used, so transformers' AutoTokenizer loads the folder and no command falls back with a note;
`generate` says so when the model's first token ends the text; `plan` takes the `model.lora` that `fit` takes.

References: transformers' AutoTokenizer against mistral-common's v1 tokenizer (the ids), a model whose
first greedy token is EOS by a hand calculation, and PEFT's meaning of "all-linear" (every linear layer of
the blocks, not the output layer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from helpers.configs import tiny_fit_config, write_config
from helpers.processes import without_process_group
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.child_processes import python_module_command
from mistral_lightning.cli import main as cli_main

FALLBACK_NOTE = "names no tokenizer"


def _ends_at_once() -> Mistral:
    """A model whose first greedy token is EOS (id 2) after any prompt: the blocks add nothing to the
    residual stream (o and down are zero), every embedding is the same vector e, and only the LM head's row
    2 is non-zero, equal to e, so its logit is e . RMSNorm(e) = |e|^2 / rms(e) > 0 while every other is 0."""
    torch.manual_seed(0)
    model = Mistral(MistralConfig.from_name("tiny"))
    model.init_weights()
    with torch.no_grad():
        model.embed.weight.copy_(torch.linspace(0.5, 1.5, model.config.hidden_size))
        for layer in model.layers:
            layer.attn.o.weight.zero_()
            layer.mlp.down.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[2] = model.embed.weight[0]
    return model


@pytest.fixture(scope="module")
def scratch_export(tmp_path_factory) -> Path:
    """`export` of a checkpoint as `fit` writes it for a model trained from scratch (no model.pretrained)."""
    root = tmp_path_factory.mktemp("scratch")
    model = _ends_at_once()
    state = {f"model.{key}": tensor for key, tensor in model.state_dict().items()}
    checkpoint = root / "last.ckpt"
    torch.save({"state_dict": state, "mistral_config": dataclasses.asdict(model.config)}, checkpoint)
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(root / "hf")]) == 0
    return root / "hf"


def test_a_model_trained_from_scratch_exports_its_tokenizer(scratch_export):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(scratch_export)
    v1 = MistralTokenizer.v1().instruct_tokenizer.tokenizer
    for text in ("Reverse the order of the words. cat dog", "How many words are there?\n1"):
        assert hf_tokenizer(text).input_ids == v1.encode(text, bos=True, eos=False), text
    assert hf_tokenizer.eos_token_id == v1.eos_id == 2


def test_generate_on_the_export_says_when_the_first_token_ends_the_text(scratch_export, capsys):
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(scratch_export), "--prompt", "Hello", "--device", "cpu"]
    assert cli_main([*argv, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "\n"
    notes = printed.err.strip().splitlines()
    assert len(notes) == 1 and "first token was end-of-text (id 2), so it generated nothing" in notes[0]
    assert FALLBACK_NOTE not in printed.err  # the export brought its tokenizer


@pytest.mark.processes
def test_plan_takes_all_linear_lora_targets_as_fit_does(toy_data, tmp_path):
    config = tiny_fit_config(tmp_path, toy_data, model={"lora": {"targets": "all-linear"}})
    path = write_config(config, tmp_path / "lora.yaml")
    # Its own process, as a user runs it: the simulation needs a process of its own, which an in-process fit
    # earlier in this worker would have taken.
    done = subprocess.run(
        python_module_command(
            "mistral_lightning", "plan", "--config", str(path), "--plan_output", "plan.json"
        ),
        cwd=tmp_path,
        env=without_process_group(os.environ),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # PEFT's "all-linear": every linear layer of the blocks, the output layer left out.
    targets = ["q", "k", "v", "o", "gate", "up", "down"]
    assert json.loads((tmp_path / "plan.json").read_text())["layout"]["lora"]["targets"] == targets
    assert f"LoRA rank 8 on {', '.join(targets)}" in done.stdout
