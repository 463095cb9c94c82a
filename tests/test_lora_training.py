"""LoRA training: TP=2 (SP on and off) and DP=2 (FSDP2) log the one-device losses, and the adapters of a TP=2
forward add no collective; stop + resume is bit-exact; checkpoints hold the adapters and their optimizer state
only; configs/tiny/lora.yaml trains through the CLI; bad input stops before any step in one line."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from helpers.checkpoints import one_line_error
from helpers.processes import run_on_ranks
from helpers.training import (
    Recorder,
    StepCounter,
    datamodule,
    launch,
    module,
    trainer,
    write_instruction_data,
)
from torch.distributed.checkpoint import FileSystemReader

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.adapters.lora import LoRAConfig, apply_lora, is_adapter_parameter
from mistral_lightning.cli import main as cli_main
from mistral_lightning.errors import UserError
from mistral_lightning.training.strategy import DeviceModelParallelStrategy

pytestmark = pytest.mark.timeout(600)

ALL_TARGETS = ["q", "k", "v", "o", "gate", "up", "down", "lm_head"]
# A large step, so that the adapters (B starts at zero) change the later steps' losses.
LORA_RUN = {"lora": {"rank": 4, "alpha": 8.0, "targets": ALL_TARGETS}, "optimizer": {"lr": 2e-2}}


def checked_strategy() -> DeviceModelParallelStrategy:
    """The strategy `mistral-lightning fit` uses (adapter-only checkpoints), on one CPU process."""
    return DeviceModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)


def adapter_names(targets: list[str]) -> set[str]:
    model = Mistral(MistralConfig.from_name("tiny"))
    apply_lora(model, LoRAConfig(targets=tuple(targets)))
    return {name for name, _ in model.named_parameters() if is_adapter_parameter(name)}


@pytest.fixture(scope="module")
def lora_straight(toy_data, single_thread, tmp_path_factory):
    """TP=1: six LoRA steps straight in this process, checkpointed after step 3 and step 6."""
    root = tmp_path_factory.mktemp("lora_straight")
    recorder = Recorder()
    trainer(root, callbacks=[recorder], checkpoint_every=3, strategy=checked_strategy()).fit(
        module(**LORA_RUN), datamodule=datamodule(toy_data)
    )
    return recorder, root / "checkpoints"


@pytest.fixture(scope="module")
def lora_two_ranks(toy_data, tmp_path_factory) -> dict:
    scenarios = [
        {"name": "tp2_sp", "data": toy_data, "tensor_parallel": 2, "module": LORA_RUN},
        {
            "name": "tp2_no_sp",
            "data": toy_data,
            "tensor_parallel": 2,
            "module": {**LORA_RUN, "parallel": {"sequence_parallel": False}},
        },
        {"name": "dp2_fsdp", "data": toy_data, "data_parallel": 2, "module": LORA_RUN},
    ]
    codes, results, output = launch(scenarios, tmp_path_factory.mktemp("lora_two_ranks"), nprocs=2)
    assert codes == [0, 0] and results is not None, output
    return results


@pytest.mark.processes
@pytest.mark.parametrize("run", ["tp2_sp", "tp2_no_sp", "dp2_fsdp"])
def test_lora_losses_under_tp2_and_fsdp_match_one_device(lora_two_ranks, lora_straight, run):
    straight, _ = lora_straight
    losses = lora_two_ranks[run]["losses"]
    assert len(losses) == len(straight.losses) == 6
    assert losses == pytest.approx(straight.losses, rel=1e-5)
    # The gradient norm is the adapters' alone: the same norm means the same adapter gradients reached AdamW.
    assert all(norm > 0 for norm in straight.grad_norms)
    assert lora_two_ranks[run]["grad_norms"] == pytest.approx(straight.grad_norms, rel=1e-4)


def test_stop_and_resume_is_bit_exact(lora_straight, toy_data, tmp_path):
    straight, checkpoints = lora_straight
    recorder = Recorder()
    trainer(tmp_path, callbacks=[recorder], strategy=checked_strategy()).fit(
        module(**LORA_RUN), datamodule=datamodule(toy_data), ckpt_path=checkpoints / "step=3.ckpt"
    )
    assert recorder.batches == straight.batches[3:]
    assert (
        recorder.losses == straight.losses[3:]
    )  # adapters, optimizer state and LR schedule restored exactly


def test_checkpoint_holds_adapters_and_their_optimizer_state_only(lora_straight):
    _, checkpoints = lora_straight
    keys = set(FileSystemReader(checkpoints / "step=6.ckpt").read_metadata().state_dict_metadata)
    weights = {key.removeprefix("state_dict.model.") for key in keys if key.startswith("state_dict.")}
    assert weights == adapter_names(ALL_TARGETS)  # no base weight
    optimizer_state = {key.removeprefix("optimizer_0.state.model.") for key in keys if ".state." in key}
    assert optimizer_state == {
        f"{name}.{state}"
        for name in adapter_names(ALL_TARGETS)
        for state in ("exp_avg", "exp_avg_sq", "step")
    }
    assert {key for key in keys if key.startswith("optimizer_0.param_groups.")} >= {
        "optimizer_0.param_groups.0.params"
    }
    assert not any(key.startswith("optimizer_0.param_groups.1.") for key in keys)  # adapters only: one group


def test_resume_with_another_lora_layout_fails_before_any_step(lora_straight, toy_data, tmp_path):
    _, checkpoints = lora_straight
    counter = StepCounter()
    other = {**LORA_RUN, "lora": {**LORA_RUN["lora"], "rank": 8}}
    with pytest.raises(
        UserError, match=r"step=3.ckpt: saved with model.lora=\{'rank': 4.*this run has .*'rank': 8"
    ):
        trainer(tmp_path, callbacks=[counter], strategy=checked_strategy()).fit(
            module(**other), datamodule=datamodule(toy_data), ckpt_path=checkpoints / "step=3.ckpt"
        )
    assert counter.steps == 0


def test_lora_over_a_missing_base_is_one_line():
    with pytest.raises(UserError, match=r"model.pretrained=/nowhere/base is not a folder: LoRA adapters"):
        module(model_config="tiny", pretrained="/nowhere/base", **LORA_RUN)


# ---------------------------------------------------------------------- tensor parallelism, directly
def _tp2_against_one_device() -> dict:
    """Per SP setting, on each of 2 ranks: the tiny model with LoRA on every target under TP=2 against the same
    weights on one device (DP=2, the same batch), and the collectives of a TP=2 forward with and without LoRA."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    from mistral_lightning.training.parallel import init_adapters, init_weights, parallelize

    torch.set_num_threads(1)
    config = MistralConfig.from_name("tiny", vocab_size=512)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=tuple(ALL_TARGETS))
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))

    def full(tensor):
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def build(tp: int, sequence_parallel: bool, with_lora: bool) -> Mistral:
        mesh = init_device_mesh("cpu", (2 // tp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
        with torch.device("meta"):
            model = Mistral(config)
        parallelize(model, mesh, sequence_parallel=sequence_parallel, lora=lora if with_lora else None)
        model.to_empty(device="cpu")
        init_weights(model, seed=5)
        if with_lora:
            init_adapters(model, seed=5)
            with (
                torch.no_grad()
            ):  # B nonzero, so that A has gradients: drawn whole, each rank keeps its slice
                generator = torch.Generator().manual_seed(6)
                for name, param in model.named_parameters():
                    if ".lora_B." in name:
                        value = torch.randn(param.shape, generator=generator) * 0.1
                        param.to_local().copy_(
                            distribute_tensor(
                                value, param.device_mesh, param.placements, src_data_rank=None
                            ).to_local()
                        )
        return model

    def run(model: Mistral) -> tuple[torch.Tensor, dict, dict]:
        with CommDebugMode() as comms, loss_parallel():
            logits = full(model(input_ids)).detach()
        with loss_parallel():
            model.loss(input_ids, input_ids.roll(-1, 1), chunk_size=8).backward()
        grads = {name: full(p.grad) for name, p in model.named_parameters() if p.grad is not None}
        return logits, grads, {str(op): count for op, count in comms.get_comm_counts().items()}

    results = {}
    for sequence_parallel in (True, False):
        one_logits, one_grads, _ = run(build(1, sequence_parallel, True))
        tp_model = build(2, sequence_parallel, True)
        # The tensor-parallel placement (the mesh's last dimension) of layer 0's adapters.
        layouts = {
            name: str(param.placements[-1])
            for name, param in tp_model.named_parameters()
            if name.startswith("layers.0.") and is_adapter_parameter(name)
        }
        tp_logits, tp_grads, tp_comms = run(tp_model)
        _, _, base_comms = run(build(2, sequence_parallel, False))
        results[sequence_parallel] = {
            "logits_diff": (tp_logits - one_logits).abs().max().item(),
            "grad_diffs": {
                name: (tp_grads[name] - grad).abs().max().item() for name, grad in one_grads.items()
            },
            "tp_grad_names": sorted(tp_grads),
            "comms": tp_comms,
            "base_comms": base_comms,
            "layouts": layouts,
        }
    return results


@pytest.mark.processes
def test_tp2_adapters_match_one_device_and_add_no_collective():
    for rank_results in run_on_ranks(_tp2_against_one_device, world_size=2):
        for result in rank_results.values():
            assert result["logits_diff"] < 1e-5
            assert (
                result["tp_grad_names"] == sorted(result["grad_diffs"]) == sorted(adapter_names(ALL_TARGETS))
            )
            assert max(result["grad_diffs"].values()) < 1e-5, result["grad_diffs"]
            assert result["comms"] == result["base_comms"]  # the same collectives as without adapters
            # Column-parallel layers: B split like the weight's rows, A whole; row-parallel: A split like its columns.
            for layer in ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up"):
                assert result["layouts"][f"layers.0.{layer}.lora_A.weight"] == "R"
                assert result["layouts"][f"layers.0.{layer}.lora_B.weight"] == "S(0)"
            for layer in ("attn.o", "mlp.down"):
                assert result["layouts"][f"layers.0.{layer}.lora_A.weight"] == "S(1)"
                assert result["layouts"][f"layers.0.{layer}.lora_B.weight"] == "R"


# ---------------------------------------------------------------------- the CLI and the configs
@pytest.mark.parametrize("config", ["configs/tiny/lora.yaml", "configs/mistral-7b-32k/lora_1dev.yaml"])
def test_lora_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    assert "  lora:\n    rank:" in capsys.readouterr().out


def _tiny_lora_argv(tmp_path, callbacks: list | None = None) -> list[str]:
    data = write_instruction_data(str(tmp_path / "sft"), [(10, 20)] * 40)
    return [
        "fit",
        "--config",
        "configs/tiny/lora.yaml",
        f"--data.init_args.data_prefix={data}",
        "--data.init_args.micro_batch_size=2",
        "--data.init_args.split=1,0,0",
        "--trainer.max_steps=3",
        "--trainer.log_every_n_steps=1",
        f"--trainer.callbacks={json.dumps(callbacks or [])}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]


def test_tiny_lora_config_trains_through_the_cli(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints"
    callback = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(checkpoint), "every_n_train_steps": 3},
    }
    assert cli_main(_tiny_lora_argv(tmp_path, [callback])) == 0
    (metrics,) = tmp_path.glob("logs/**/metrics.csv")
    losses = [float(row["train/loss"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    (saved,) = checkpoint.iterdir()
    keys = FileSystemReader(saved).read_metadata().state_dict_metadata
    weights = {key.removeprefix("state_dict.model.") for key in keys if key.startswith("state_dict.")}
    assert weights and all(is_adapter_parameter(name) for name in weights)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--model.lora.targets=[q, qkv]", r"model.lora.targets: \['qkv'\] not among"),
        ("--model.lora.rank=0", r"model.lora.rank=0 must be a positive integer"),
    ],
)
def test_bad_lora_options_are_one_line_before_any_step(option, message, tmp_path, capsys):
    error = one_line_error(capsys, [*_tiny_lora_argv(tmp_path), option])
    assert re.search(message, error), error
    assert not list(tmp_path.glob("logs/**/metrics.csv"))  # refused before the trainer ran


# ---------------------------------------------------------------------- the rest of the plan
def _checkpointing_and_bf16_runs() -> dict[str, tuple[float, float]]:
    """Per activation-checkpointing mode and precision, the loss of one backward and the largest difference of
    its adapter gradients from those without checkpointing in fp32 (small results: a spawned worker's queue)."""
    from torch.distributed.device_mesh import init_device_mesh

    from mistral_lightning.training.parallel import (
        init_adapters,
        init_weights,
        mixed_precision_policy,
        parallelize,
    )

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    config = MistralConfig.from_name("tiny", vocab_size=512)
    batch = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = None
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        for mode in ("none", "full", "selective"):
            with torch.device("meta"):
                model = Mistral(config)
            lora = LoRAConfig(rank=4, targets=tuple(ALL_TARGETS))
            policy = mixed_precision_policy(precision)
            parallelize(model, mesh, activation_checkpointing=mode, mp_policy=policy, lora=lora)
            model.to_empty(device="cpu")
            init_weights(model, seed=1)
            init_adapters(model, seed=1)
            with torch.no_grad():  # B nonzero, so that A has gradients
                for name, param in model.named_parameters():
                    if ".lora_B." in name:
                        param.to_local().normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
            loss = model.loss(batch, batch.roll(-1, 1), chunk_size=8)
            loss.backward()
            grads = torch.cat(
                [p.grad.full_tensor().float().flatten() for p in model.parameters() if p.grad is not None]
            )
            reference = grads if reference is None else reference
            results[f"{precision}/{mode}"] = (loss.item(), (grads - reference).abs().max().item())
    results["scale"] = (0.0, reference.abs().max().item())
    return results


@pytest.mark.processes
def test_activation_checkpointing_and_bf16_mixed_keep_the_adapter_gradients():
    (results,) = run_on_ranks(_checkpointing_and_bf16_runs, world_size=1)
    assert results["scale"][1] > 0.01  # the adapters have gradients to compare
    for mode in ("full", "selective"):  # recomputation changes nothing
        assert results[f"32-true/{mode}"] == results["32-true/none"]
        assert results[f"bf16-mixed/{mode}"] == results["bf16-mixed/none"]
    loss_fp32, _ = results["32-true/none"]
    loss_bf16, grad_error_bf16 = results["bf16-mixed/none"]
    assert loss_bf16 == pytest.approx(loss_fp32, rel=1e-2)
    assert 0 < grad_error_bf16 < 0.1 * results["scale"][1]


def test_training_starts_from_a_peft_adapter_folder(toy_data, single_thread, tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    base_folder = Mistral(MistralConfig.from_name("tiny")).save_pretrained(tmp_path / "base")
    hf = transformers.MistralForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "adapter")  # PEFT's own folder
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    lora = {"rank": 4, "alpha": 8.0, "targets": ["q", "v"], "adapter": str(tmp_path / "adapter")}
    # lr 0: the one step changes nothing, so the adapters after it are the ones loaded.
    run = module(
        model_config=None,
        pretrained=str(base_folder),
        lora=lora,
        optimizer={"lr": 0.0},
        schedule={"min_lr": 0.0},
    )
    trainer(tmp_path / "run", max_steps=1).fit(run, datamodule=datamodule(toy_data))
    for name, param in run.model.named_parameters():
        if is_adapter_parameter(name):
            index, module_name = name.split(".")[1], {"q": "q_proj", "v": "v_proj"}[name.split(".")[3]]
            factor = name.split(".")[4]
            peft_key = f"base_model.model.model.layers.{index}.self_attn.{module_name}.{factor}.weight"
            assert torch.equal(param.full_tensor(), saved[peft_key]), name


@pytest.mark.processes
def test_a_one_device_lora_checkpoint_resumes_under_tp2(toy_data, tmp_path):
    import shutil

    from helpers.checkpoints import SMALL_VOCAB, fit_config, launch_fit_ranks, logged_losses

    lora = ["--model.lora.rank=4", f"--model.lora.targets={json.dumps(ALL_TARGETS)}"]
    straight = tmp_path / "straight"
    assert (
        cli_main(
            ["fit", "--config", str(fit_config(straight, toy_data, lr=2e-2, model_config=SMALL_VOCAB)), *lora]
        )
        == 0
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step=2.ckpt", resumed / "checkpoints" / "step=2.ckpt")
    config = fit_config(resumed, toy_data, lr=2e-2, model_config=SMALL_VOCAB)
    results = launch_fit_ranks(["fit", "--config", str(config), "--ckpt_path", "last", *lora], tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    reference = logged_losses(straight)
    # The DCP checkpoint of the adapters reshards to TP=2; the base comes from the same init_seed.
    assert logged_losses(resumed) == pytest.approx({step: reference[step] for step in (2, 3, 4, 5)}, rel=1e-5)
