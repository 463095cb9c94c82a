"""LoRA on the model against Hugging Face PEFT's LoraModel on transformers' MistralForCausalLM (logits, loss and
every adapter gradient, fp32); names, the optimizer's parameters and bad settings. Under tensor parallelism:
tests/test_lora_training.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.adapters.lora import (
    LoRAConfig,
    LoRAError,
    apply_lora,
    is_adapter_parameter,
    lora_layers,
)
from mistral_lightning.training.optim import OptimizerConfig, build_optimizer

# Our layer name -> transformers' module name, written out here so the test does not reuse our own name table.
HF_MODULES = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj"}
HF_TARGETS |= {"up": "up_proj", "down": "down_proj", "lm_head": "lm_head"}


def peft_name(ours: str) -> str:
    """'layers.0.attn.q.lora_A.weight' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'."""
    layer, factor, _ = ours.rsplit(".", 2)
    if layer == "lm_head":
        return f"base_model.model.lm_head.{factor}.default.weight"
    _, index, module = layer.split(".", 2)
    return f"base_model.model.model.layers.{index}.{HF_MODULES[module]}.{factor}.default.weight"


def tiny() -> MistralConfig:
    return MistralConfig.from_name("tiny", vocab_size=512, sliding_window=7)


def lora_pair(targets: tuple[str, ...], tmp_path) -> tuple[Mistral, torch.nn.Module, LoRAConfig]:
    """Our model with LoRA and PEFT's, with the same base weights and the same random (nonzero) adapters."""
    config = tiny()
    torch.manual_seed(0)
    ours = Mistral(config)
    ours.init_weights()
    folder = ours.save_pretrained(tmp_path / "hf")
    base = transformers.MistralForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    lora = LoRAConfig(rank=4, alpha=12.0, targets=targets)
    apply_lora(ours, lora)
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=[HF_TARGETS[t] for t in lora.targets],
    )
    theirs = get_peft_model(base, peft_config)
    theirs_params = dict(theirs.named_parameters())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if is_adapter_parameter(name):
                param.copy_(
                    torch.randn(param.shape, generator=generator) * 0.1
                )  # B nonzero, so A gets gradients
                theirs_params[peft_name(name)].copy_(param)
    return ours, theirs, lora


@pytest.mark.parametrize(
    "targets",
    [("q", "k", "v", "o"), ("all-linear",), ("q", "k", "v", "o", "gate", "up", "down", "lm_head")],
    ids=["default", "all-linear", "all-linear+lm_head"],
)
def test_forward_loss_and_adapter_gradients_equal_peft(targets, tmp_path):
    ours, theirs, lora = lora_pair(targets, tmp_path)
    adapter_names = [name for name, _ in ours.named_parameters() if is_adapter_parameter(name)]
    trainable = sorted(name for name, p in theirs.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        peft_name(name) for name in adapter_names
    )  # the same layers adapted, nothing else
    input_ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(2))
    labels = input_ids.roll(-1, 1)

    torch.testing.assert_close(ours(input_ids), theirs(input_ids).logits, rtol=0, atol=1e-5)

    # Through the training loss (the chunked LM head + cross-entropy) against transformers' logits.
    ours.loss(input_ids, labels, chunk_size=8).backward()
    F.cross_entropy(theirs(input_ids).logits.flatten(0, 1), labels.flatten()).backward()
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if is_adapter_parameter(name):
            theirs_grad = theirs_params[peft_name(name)].grad
            assert param.grad is not None and theirs_grad.abs().max() > 0, name
            torch.testing.assert_close(param.grad, theirs_grad, rtol=0, atol=1e-5, msg=name)
        else:
            assert param.grad is None, name  # the base is frozen
    assert {n.rpartition(".")[2] for n, _ in lora_layers(ours)} == set(lora.targets)


def test_names_stay_and_only_adapters_reach_the_optimizer():
    model = Mistral(tiny())
    before = [name for name, _ in model.named_parameters()]
    apply_lora(model, LoRAConfig(rank=2, targets=("q", "down")))
    after = [name for name, _ in model.named_parameters()]
    assert [name for name in after if not is_adapter_parameter(name)] == before
    assert "layers.0.attn.q.lora_A.weight" in after and "layers.1.mlp.down.lora_B.weight" in after
    (group,) = build_optimizer(
        model, OptimizerConfig()
    ).param_groups  # adapters are matrices: one decay group
    assert {id(p) for p in group["params"]} == {
        id(p) for n, p in model.named_parameters() if is_adapter_parameter(n)
    }
    assert len(group["params"]) == 2 * 2 * model.config.num_layers


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"targets": ("q", "qkv")}, r"model.lora.targets: \['qkv'\] not among"),
        ({"rank": 0}, r"model.lora.rank=0 must be a positive integer"),
        ({"rank": -4}, r"model.lora.rank=-4 must be a positive integer"),
        ({"dropout": 1.0}, r"model.lora.dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_lora_settings_are_one_line(settings, message):
    with pytest.raises(LoRAError, match=message) as error:
        LoRAConfig(**settings)
    assert "\n" not in str(error.value)


def test_a_target_the_plan_does_not_split_is_refused():
    from mistral_lightning.adapters.lora import shard_adapters

    model = Mistral(tiny())
    apply_lora(model, LoRAConfig(targets=("q",)))  # not tensor-parallelised: its weight is a plain tensor
    with pytest.raises(LoRAError, match=r"layers.0.attn.q is not split by the tensor-parallel plan"):
        shard_adapters(model, tp_mesh=None)  # refused before any mesh is used
