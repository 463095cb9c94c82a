"""QLoRA: the frozen block projections in torchao's NF4, adapters trained over them.

References: torchao's own `to_nf4(...).get_original_weight()` of the dense weights, and a one-rank run
against a two-rank FSDP2 run over the same global batch.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers.processes import run_on_ranks
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as torchao_to_nf4

from mistral_lightning.adapters.lora import LoRAConfig, LoRAError, apply_lora, lora_layers
from mistral_lightning.adapters.nf4 import (
    check_quantize_base,
    materialize_nf4_,
    nf4_bytes,
    nf4_layers,
    quantize_base_,
)
from mistral_lightning.config import MistralConfig
from mistral_lightning.demo.data import write_demo_data
from mistral_lightning.model import Mistral
from mistral_lightning.training.parallel import init_adapters, init_weights

# Every projection's element count a multiple of 64 x 256, as torchao's NF4 blocks need (7B's are too).
QLORA_TINY = dict(hidden_size=256, head_dim=32, num_heads=4, num_kv_heads=2, intermediate_size=512)
ALL_LINEAR = LoRAConfig(rank=8, alpha=16.0, targets="all-linear", quantize_base="nf4")


def _config() -> MistralConfig:
    return MistralConfig.from_name("tiny", **QLORA_TINY)


def _qlora_model(seed: int = 0, lora: LoRAConfig = ALL_LINEAR) -> Mistral:
    """Built as the training module builds it: on the meta device, adapters, NF4 base, then filled."""
    with torch.device("meta"):
        model = Mistral(_config())
    apply_lora(model, lora)
    quantize_base_(model)
    model.to_empty(device="cpu")
    materialize_nf4_(model)
    init_weights(model, seed)
    init_adapters(model, seed)
    return model


def _dense_model(seed: int = 0) -> Mistral:
    with torch.device("meta"):
        model = Mistral(_config())
    model.to_empty(device="cpu")
    init_weights(model, seed)
    return model


def test_nf4_base_is_torchaos_dequantisation_bit_for_bit():
    model, dense = _qlora_model(), _dense_model()
    quantized = dict(nf4_layers(model))
    assert len(quantized) == 7 * _config().num_layers
    dense_modules = dict(dense.named_modules())
    generator = torch.Generator().manual_seed(1)
    for name, layer in quantized.items():
        reference = torchao_to_nf4(dense_modules[name].weight.detach()).get_original_weight()
        assert torch.equal(layer.weight.get_original_weight(), reference), name
        # B starts at zero: the adapted layer is the dequantised base exactly.
        x = torch.randn(3, 5, layer.in_features, generator=generator)
        assert torch.equal(layer(x), F.linear(x, reference)), name
    # Embedding, norms and LM head stay dense and unchanged.
    dense_params = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        if name in dense_params and name.rpartition(".")[0] not in quantized:
            assert torch.equal(param, dense_params[name]), name
    # The bytes torchao holds for one layer are what the memory plan counts.
    q = quantized["layers.0.attn.q"].weight
    held = sum(getattr(q, attr).nbytes for attr in q.__tensor_flatten__()[0])
    assert held == nf4_bytes(q.numel(), q.dtype)
    assert q.numel() * 4 / held > 7.5  # about 4.1 bits a weight against fp32's 32


def _demo_batches(tokenizer, folder, batch: int = 2, seq: int = 96) -> torch.Tensor:
    paths = write_demo_data(folder, train_rows=40, heldout_rows=1, mmlu_test_per_subject=1)
    ids = [
        i for text in pq.read_table(paths.train).column("text").to_pylist() for i in tokenizer.encode(text)
    ]
    usable = len(ids) // (batch * seq) * batch * seq
    return torch.tensor(ids[:usable]).view(-1, batch, seq)


def test_qlora_loss_decreases_on_demo_data(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = _qlora_model()
    codes = {name: layer.weight.quantized_data.clone() for name, layer in nf4_layers(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.{part}.weight" for name, _ in lora_layers(model) for part in ("lora_A", "lora_B")
    }
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batches = _demo_batches(tokenizer, tmp_path)
    losses = []
    for step in range(12):
        ids = batches[step % len(batches)]
        loss = model.loss(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    for name, layer in nf4_layers(model):
        assert torch.equal(layer.weight.quantized_data, codes[name]), name  # the base never moves


def _data_parallel_losses(batch: torch.Tensor) -> list[float]:
    """FSDP2 over the data-parallel ranks with the NF4 weights left out, as `parallel.apply_fsdp` is told to."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    with torch.device("meta"):
        model = Mistral(_config())
    apply_lora(model, ALL_LINEAR)
    nf4 = quantize_base_(model)
    for block in model.layers:
        fully_shard(block, mesh=mesh, ignored_params=nf4)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=nf4)
    register_fsdp_forward_method(model, "loss")
    model.to_empty(device="cpu")
    materialize_nf4_(model)
    init_weights(model, 0)
    init_adapters(model, 0)
    return _train(model, batch.chunk(world)[rank])


def _train(model: Mistral, ids: torch.Tensor, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.loss(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.processes
def test_qlora_with_fsdp2_data_parallel_matches_one_rank():
    batch = torch.randint(0, 32000, (4, 32), generator=torch.Generator().manual_seed(0))
    single = _train(_qlora_model(), batch)  # one process, no FSDP
    pair = run_on_ranks(_data_parallel_losses, batch, world_size=2)
    assert single[-1] < single[0]
    # Equal halves: the one-rank loss is the mean of the two ranks' losses, step by step.
    assert [(a + b) / 2 for a, b in zip(*pair)] == pytest.approx(single, abs=1e-5)


def test_unsupported_qlora_is_one_line():
    with pytest.raises(LoRAError, match=r"tensor_parallel_size=1 only \(got 2\)") as error:
        check_quantize_base(ALL_LINEAR, tensor_parallel_size=2)
    assert "\n" not in str(error.value)
    check_quantize_base(ALL_LINEAR, tensor_parallel_size=1)
    check_quantize_base(LoRAConfig(), tensor_parallel_size=2)
    with pytest.raises(LoRAError, match=r"quantize_base='int4' is not one of"):
        LoRAConfig(quantize_base="int4")
    with torch.device("meta"):
        model = Mistral(MistralConfig.from_name("tiny"))  # hidden 64: 4096-element projections
    apply_lora(model, ALL_LINEAR)
    with pytest.raises(LoRAError, match=r"layers\.0\.attn\.q\.weight \[64, 64\] has 4096 elements") as error:
        quantize_base_(model)
    assert "\n" not in str(error.value)


def test_qlora_fit_through_the_cli_checkpoints_adapters_only_and_exports_merged(tmp_path, monkeypatch):
    """`fit --config configs/tiny/lora.yaml` with `model.lora.quantize_base nf4` over an HF base: the block
    projections train as NF4 (the checkpoint holds the adapters and nothing of the base), and `export` merges
    them into the dense base, as transformers then reads."""
    from helpers.training import write_instruction_data
    from transformers import MistralForCausalLM

    from mistral_lightning.checkpoint.lightning_ckpt import LightningCheckpoint
    from mistral_lightning.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    base = _dense_model(seed=3).eval()
    folder = base.save_pretrained(tmp_path / "base", dtype=torch.float32)
    data = write_instruction_data(str(tmp_path / "sft"), [(5, 20)] * 8)
    checkpoints = tmp_path / "checkpoints"
    fit = ["fit", "--config", "tiny/lora", "--model.pretrained", str(folder), "--model.model_config", "null"]
    fit += ["--model.lora.quantize_base", "nf4", "--model.lora.targets", "[q, v, down]"]
    fit += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]
    fit += ["--trainer.precision", "bf16-mixed"]  # the 7B configs' precision: bf16 activations over NF4
    fit += ["--data.init_args.data_prefix", data, "--data.init_args.split", "1,0,0"]
    fit += ["--data.init_args.seq_length", "32", "--data.init_args.micro_batch_size", "2"]
    fit += ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={checkpoints}"]
    fit += ["--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.filename={step}"]
    assert cli_main(fit) == 0
    checkpoint = LightningCheckpoint(checkpoints / "step=2.ckpt")
    adapters = {
        f"layers.{i}.{m}.lora_{p}.weight"
        for i in range(2)
        for m in ("attn.q", "attn.v", "mlp.down")
        for p in "AB"
    }
    assert not checkpoint.holds_base
    assert set(checkpoint.extra_tensor_names) == adapters
    checkpoint.close()
    assert (
        cli_main(
            ["export", "--checkpoint", str(checkpoints / "step=2.ckpt"), "--out", "merged", "--dtype", "fp32"]
        )
        == 0
    )
    merged = MistralForCausalLM.from_pretrained(tmp_path / "merged").eval()
    moved = merged.model.layers[0].self_attn.q_proj.weight - base.layers[0].attn.q.weight
    assert moved.abs().max() > 0  # the two steps' adapters are in the merged weights
    torch.testing.assert_close(merged.model.layers[0].self_attn.k_proj.weight, base.layers[0].attn.k.weight)
