"""`mistral-lightning convert`: HF <-> Megatron/ModelLink at any TP/PP, and `fit` checkpoints -> HF.

Expected Megatron tensors are built here by hand with Megatron's own reshape/chunk formulas (not
with the converter's plans); HF outputs are checked against the source files or transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from lightning.fabric.utilities.data import AttributeDict
from safetensors.torch import load_file, save_file

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.checkpoint import megatron
from mistral_lightning.checkpoint.hf import to_hf_name
from mistral_lightning.checkpoint.megatron_layout import MegatronLayout, build_tensor
from mistral_lightning.cli import main
from mistral_lightning.config import parameter_shapes
from mistral_lightning.tokenizer import default_tokenizer_path

# 8 KV heads so that TP8 is possible; vocab 509 is prime, so every TP > 1 pads the vocabulary.
ROUND_TRIP = MistralConfig(
    vocab_size=509,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=8,
    num_kv_heads=8,
    head_dim=8,
    sliding_window=32,
    max_seq_length=128,
)
# Grouped-query attention (2 query heads per KV group) to exercise the QKV interleave.
GQA = ROUND_TRIP.replace(num_kv_heads=4, rope_theta=1e6)


def _random_model(config: MistralConfig) -> Mistral:
    torch.manual_seed(0)
    model = Mistral(config)
    model.init_weights()
    # Random norms, so that a norm taken from the wrong layer or rank cannot pass unnoticed.
    for param in model.parameters():
        if param.ndim == 1:
            param.data.uniform_(0.5, 1.5)
    return model


def _write_hf(config: MistralConfig, path: Path, dtype=torch.bfloat16) -> Mistral:
    model = _random_model(config)
    model.to(dtype).save_pretrained(path)
    return model


def _convert(command_line: str) -> int:
    return main(["convert", *shlex.split(command_line)])


def _error(capsys, command_line: str) -> str:
    capsys.readouterr()
    assert _convert(command_line) == 2
    return capsys.readouterr().err


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _assert_same_hf(actual: Path, expected: Path) -> None:
    got, want = _hf_tensors(actual), _hf_tensors(expected)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    config = json.loads((actual / "config.json").read_text())
    assert config == json.loads((expected / "config.json").read_text())


def _rank_file(root: Path, folder: str) -> dict:
    return torch.load(root / "iter_0000001" / folder / "model_optim_rng.pt", weights_only=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("convert") / "hf"
    _write_hf(ROUND_TRIP, path)
    return path


@pytest.fixture
def tp4(hf_dir, tmp_path) -> Path:
    out = tmp_path / "tp4"
    assert (
        _convert(
            f"--loader hf --saver megatron --load-dir {hf_dir} --save-dir {out} --target-tensor-parallel-size 4"
        )
        == 0
    )
    return out


# ---------------------------------------------------------------- layout


def test_megatron_layout_matches_megatrons_formulas(tmp_path):
    hf, out = tmp_path / "hf", tmp_path / "mg"
    _write_hf(GQA, hf, dtype=torch.float32)
    assert (
        _convert(
            f"--loader hf --saver megatron --load-dir {hf} --save-dir {out} --target-tensor-parallel-size 2 "
            "--target-pipeline-parallel-size 2 --params-dtype bf16"
        )
        == 0
    )
    w = {k: v.to(torch.bfloat16) for k, v in _hf_tensors(hf).items()}
    tp, hidden, head_dim = 2, GQA.hidden_size, GQA.head_dim
    groups, q_per_group = GQA.num_kv_heads, GQA.num_heads // GQA.num_kv_heads * head_dim

    def padded(t: torch.Tensor) -> torch.Tensor:  # Megatron repeats the last row: 509 -> 510 rows at TP2
        return torch.cat([t, t[-1:]])

    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    folders = ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert sorted(os.listdir(out / "iter_0000001")) == folders
    for r in range(tp):
        for stage in range(2):
            state = _rank_file(out, f"mp_rank_{r:02d}_{stage:03d}")
            assert set(state) == {"args", "checkpoint_version", "iteration", "model"}
            assert state["checkpoint_version"] == 3.0 and state["iteration"] == 1
            args = state["args"]
            assert isinstance(args, Namespace)
            assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
            assert (args.num_layers, args.hidden_size, args.ffn_hidden_size) == (4, 64, 128)
            assert (args.num_attention_heads, args.group_query_attention, args.num_query_groups) == (
                8,
                True,
                4,
            )
            assert (args.kv_channels, args.padded_vocab_size, args.make_vocab_size_divisible_by) == (
                8,
                510,
                1,
            )
            assert (args.rotary_base, args.sliding_window, args.params_dtype) == (1e6, 32, torch.bfloat16)
            assert args.swiglu and args.untie_embeddings_and_output_weights and not args.add_bias_linear
            assert (args.position_embedding_type, args.normalization) == ("rope", "RMSNorm")

            lm = state["model"]["language_model"]
            encoder = lm["encoder"]
            if stage == 0:
                embed = lm["embedding"]["word_embeddings"]["weight"]
                assert torch.equal(embed, padded(w["model.embed_tokens.weight"]).chunk(tp)[r])
                assert "output_layer" not in lm and "final_norm.weight" not in encoder
            else:
                assert torch.equal(lm["output_layer"]["weight"], padded(w["lm_head.weight"]).chunk(tp)[r])
                assert torch.equal(encoder["final_norm.weight"], w["model.norm.weight"])
                assert "embedding" not in lm
            assert {k.split(".")[1] for k in encoder if k.startswith("layers.")} == {"0", "1"}  # stage-local
            for local in range(2):
                ours, theirs = f"model.layers.{2 * stage + local}.", f"layers.{local}."
                q = w[ours + "self_attn.q_proj.weight"].view(groups, q_per_group, hidden)
                k = w[ours + "self_attn.k_proj.weight"].view(groups, head_dim, hidden)
                v = w[ours + "self_attn.v_proj.weight"].view(groups, head_dim, hidden)
                qkv = torch.cat([q, k, v], dim=1).reshape(-1, hidden).chunk(tp)[r]
                gate, up = w[ours + "mlp.gate_proj.weight"], w[ours + "mlp.up_proj.weight"]
                expected = {
                    "self_attention.query_key_value.weight": qkv,
                    "self_attention.dense.weight": w[ours + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r],
                    "mlp.dense_h_to_4h.weight": torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]),
                    "mlp.dense_4h_to_h.weight": w[ours + "mlp.down_proj.weight"].chunk(tp, dim=1)[r],
                    "input_norm.weight": w[ours + "input_layernorm.weight"],
                    "post_attention_norm.weight": w[ours + "post_attention_layernorm.weight"],
                }
                for key, tensor in expected.items():
                    assert torch.equal(encoder[theirs + key], tensor), (r, stage, theirs + key)


def test_qkv_rows_of_one_group_by_hand():
    # Rank 1 of TP2 holds groups 2 and 3; group 2 is q heads 4-5, then k head 2, then v head 2.
    layout = MegatronLayout(GQA, tp=2)
    d = GQA.head_dim
    weights = {name: torch.randn(shape) for name, shape in parameter_shapes(GQA).items()}
    plan = next(
        p for p in layout.rank_plan(1, 0) if p.key == "encoder.layers.0.self_attention.query_key_value.weight"
    )
    qkv = build_tensor(plan, lambda name, index: weights[name][index])
    q, k, v = (weights[f"layers.0.attn.{x}.weight"] for x in "qkv")
    assert qkv.shape == (2 * 4 * d, GQA.hidden_size)
    assert torch.equal(qkv[0 : 2 * d], q[4 * d : 6 * d])
    assert torch.equal(qkv[2 * d : 3 * d], k[2 * d : 3 * d])
    assert torch.equal(qkv[3 * d : 4 * d], v[2 * d : 3 * d])
    assert torch.equal(qkv[4 * d : 6 * d], q[6 * d : 8 * d])
    assert torch.equal(qkv[6 * d : 7 * d], k[3 * d : 4 * d])
    assert torch.equal(qkv[7 * d : 8 * d], v[3 * d : 4 * d])


def test_recipe_per_rank_shapes_for_7b_at_tp8_without_allocating():
    config = MistralConfig.from_name("mistral-7b-instruct-v0.2")
    layout = MegatronLayout(config, tp=8)
    weights = {name: torch.empty(shape, device="meta") for name, shape in parameter_shapes(config).items()}
    expected = {
        "embedding.word_embeddings.weight": (4000, 4096),
        "output_layer.weight": (4000, 4096),
        "encoder.layers.31.self_attention.query_key_value.weight": (768, 4096),
        "encoder.layers.31.self_attention.dense.weight": (4096, 512),
        "encoder.layers.31.mlp.dense_h_to_4h.weight": (3584, 4096),
        "encoder.layers.31.mlp.dense_4h_to_h.weight": (4096, 1792),
        "encoder.layers.31.input_norm.weight": (4096,),
        "encoder.final_norm.weight": (4096,),
    }
    assert layout.padded_vocab_size == 32000
    for rank in range(8):
        tensors = {p.key: build_tensor(p, lambda n, i: weights[n][i]) for p in layout.rank_plan(rank, 0)}
        assert all(t.is_meta for t in tensors.values())
        assert {key: tuple(tensors[key].shape) for key in expected} == expected
        assert len(tensors) == 2 + 1 + 6 * 32


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_hf_to_megatron_to_hf_is_bit_identical(hf_dir, tmp_path, tp, pp):
    mg, back = tmp_path / "mg", tmp_path / "back"
    assert (
        _convert(
            f"--loader hf --saver megatron --load-dir {hf_dir} --save-dir {mg} "
            f"--target-tensor-parallel-size {tp} --target-pipeline-parallel-size {pp}"
        )
        == 0
    )
    last_rank = f"mp_rank_{tp - 1:02d}" + (f"_{pp - 1:03d}" if pp > 1 else "")
    ranks = sorted(os.listdir(mg / "iter_0000001"))
    assert len(ranks) == tp * pp and ranks[-1] == last_rank
    assert _convert(f"--loader megatron --saver hf --load-dir {mg} --save-dir {back}") == 0
    _assert_same_hf(back, hf_dir)


def test_recipe_command_lines_and_megatron_resharding(hf_dir, tmp_path):
    tp8, tp2pp2 = tmp_path / "Mistral-tp8-pp1", tmp_path / "Mistral-tp2-pp2"
    assert (
        _convert(
            f"--model-type GPT --loader llama2_hf --saver megatron --load-dir {hf_dir} --save-dir {tp8} "
            f"--tokenizer-model {hf_dir}/tokenizer.model --target-tensor-parallel-size 8 --target-pipeline-parallel-size 1"
        )
        == 0
    )
    assert (
        _convert(
            f"--loader megatron --saver megatron --load-dir {tp8} --save-dir {tp2pp2} "
            "--target-tensor-parallel-size 2 --target-pipeline-parallel-size 2"
        )
        == 0
    )
    assert len(os.listdir(tp2pp2 / "iter_0000001")) == 4
    assert _rank_file(tp2pp2, "mp_rank_01_001")["args"].padded_vocab_size == 510
    # The recipe's Megatron -> HF line: the original HF folder as --save-dir, the result in its mg2hg/.
    original = tmp_path / "Mistral-7B-Instruct-v0.2"
    original.mkdir()
    (original / "config.json").write_text((hf_dir / "config.json").read_text())
    shutil.copyfile(default_tokenizer_path(), original / "tokenizer.model")
    assert (
        _convert(
            "--target-tensor-parallel-size 1 --target-pipeline-parallel-size 1 --model-type GPT --loader megatron "
            f"--saver megatron --save-model-type save_huggingface_llama --load-dir {tp2pp2} --save-dir {original}"
        )
        == 0
    )
    _assert_same_hf(original / "mg2hg", hf_dir)
    # The HF result carries the original folder's tokenizer, as ModelLink's mg2hg folder does not.
    assert (original / "mg2hg" / "tokenizer.model").read_bytes() == default_tokenizer_path().read_bytes()


def test_hf_output_carries_the_sources_tokenizer_files(hf_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(hf_dir, source)
    v3 = default_tokenizer_path().with_name("mistral_instruct_tokenizer_240323.model.v3")
    shutil.copyfile(v3, source / "tokenizer.model.v3")
    (source / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (source / "README.md").write_text("a model card is not a tokenizer file")
    (source / "generation_config.json").unlink()
    out = tmp_path / "out"
    assert _convert(f"--loader hf --saver hf --load-dir {source} --save-dir {out}") == 0
    for name in ("tokenizer.model.v3", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not (out / "README.md").exists()
    # Without a source generation_config.json, one with the model's BOS/EOS ids, as transformers reads it.
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id) == (
        ROUND_TRIP.bos_token_id,
        ROUND_TRIP.eos_token_id,
    )


def test_release_checkpoint_and_dtype_option(hf_dir, tmp_path):
    mg, out = tmp_path / "mg", tmp_path / "hf32"
    assert _convert(f"--loader hf --saver megatron --load-dir {hf_dir} --save-dir {mg}") == 0
    os.rename(mg / "iter_0000001", mg / "release")
    (mg / "latest_checkpointed_iteration.txt").write_text("release")
    assert _convert(f"--loader megatron --saver hf --load-dir {mg} --save-dir {out} --params-dtype fp32") == 0
    got, want = _hf_tensors(out), _hf_tensors(hf_dir)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float()) for k in want)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("fp16", torch.float16),
        ("float16", torch.float16),
    ],
)
def test_params_dtype_takes_both_spellings(hf_dir, tmp_path, name, dtype):
    out = tmp_path / "hf"
    assert _convert(f"--loader hf --saver hf --load-dir {hf_dir} --save-dir {out} --params-dtype {name}") == 0
    got, want = _hf_tensors(out), _hf_tensors(hf_dir)
    assert all(got[k].dtype == dtype and torch.equal(got[k], want[k].to(dtype)) for k in want)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- the `lightning` loader


def test_lightning_dcp_checkpoint_converts_to_hf_that_transformers_loads(tmp_path):
    model, ckpt, out = _random_model(GQA), tmp_path / "epoch=0-step=10.ckpt", tmp_path / "hf"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    optimizer = {"state": {"model.embed.weight": {"step": torch.tensor(3.0)}}}
    dcp.save({"state_dict": state, "optimizer_0": optimizer}, checkpoint_id=ckpt, no_dist=True)
    torch.save({"epoch": 0}, ckpt / "meta.pt")  # ModelParallelStrategy's non-tensor state, beside the shards
    (ckpt / "config.json").write_text(json.dumps(GQA.to_hf_dict("float32")))
    assert (
        _convert(f"--loader lightning --saver hf --load-dir '{ckpt}' --save-dir {out} --dtype float32") == 0
    )

    hf = transformers.MistralForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, GQA.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_lightning_single_file_checkpoint(tmp_path, capsys):
    hf_in, ckpt, out = tmp_path / "hf_in", tmp_path / "last.ckpt", tmp_path / "hf"
    model = _write_hf(GQA, hf_in, dtype=torch.float32)
    # Keys as torch.compile / activation checkpointing leave them, next to Lightning's other entries.
    state = {
        f"model._orig_mod.{k}".replace(".attn.", "._checkpoint_wrapped_module.attn."): v
        for k, v in model.state_dict().items()
    }
    saved = {"state_dict": state, "epoch": 0, "hyper_parameters": {"lr": 1e-4}}
    torch.save({**saved, "mistral_config": dataclasses.asdict(GQA)}, ckpt)  # as `fit` records it
    assert _convert(f"--loader lightning --saver hf --load-dir {ckpt} --save-dir {out} --dtype fp32") == 0
    _assert_same_hf(out, hf_in)

    shutil.rmtree(out)
    torch.save(saved, ckpt)
    command_line = f"--loader lightning --saver hf --load-dir {ckpt} --save-dir {out} --params-dtype fp32"
    assert "--model-config" in _error(capsys, command_line)
    torch.save({**saved, "hyper_parameters": AttributeDict(lr=1e-4)}, ckpt)
    assert "--trust-checkpoint" in _error(capsys, f"{command_line} --model-config {hf_in}")
    assert not out.exists()
    assert _convert(f"{command_line} --model-config {hf_in} --trust-checkpoint") == 0
    _assert_same_hf(out, hf_in)


def _save_tp_sharded(rank: int, world: int, path: str, init_file: str) -> None:
    """One rank of a TP=2 run: DTensor parameters placed as a Megatron-style TP plan places them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tensor_parallel",))
    state = {}
    for name, param in _random_model(GQA).state_dict().items():
        row_parallel = name.endswith(("o.weight", "down.weight"))
        placement = Replicate() if param.ndim == 1 else Shard(1) if row_parallel else Shard(0)
        state["model." + name] = distribute_tensor(param, mesh, [placement])
    dcp.save({"state_dict": state}, checkpoint_id=path)
    if rank == 0:  # Lightning's ModelParallelStrategy writes the non-tensor state beside the shards
        torch.save({"epoch": 0, "mistral_config": dataclasses.asdict(GQA)}, Path(path) / "meta.pt")
    dist.destroy_process_group()


@pytest.mark.processes
def test_lightning_tp_sharded_dcp_checkpoint(tmp_path):
    ckpt, out = tmp_path / "sharded.ckpt", tmp_path / "hf"
    torch.multiprocessing.spawn(_save_tp_sharded, args=(2, str(ckpt), str(tmp_path / "init")), nprocs=2)
    assert len(list(ckpt.glob("*.distcp"))) == 2  # each rank wrote its own shards
    assert _convert(f"--loader lightning --saver hf --load-dir {ckpt} --save-dir {out}") == 0
    got = _hf_tensors(out)
    # A training checkpoint's fp32 master weights are saved in bf16 unless --dtype says otherwise.
    for name, param in _random_model(GQA).state_dict().items():
        assert torch.equal(got[to_hf_name(name)], param.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _fsdp_round_trip(hf_in: str, hf_out: str) -> bool:
    """One rank of FSDP over two ranks: fill the sharded model from HF, then gather it back to HF."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from mistral_lightning.checkpoint.hf import load_hf_weights

    with torch.device("meta"):
        model = Mistral(MistralConfig.from_hf(hf_in)).to(torch.bfloat16)
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    model.to_empty(device="cpu")
    load_hf_weights(model, hf_in)
    embed = model.embed.weight
    # 509 vocabulary rows split 255 + 254: the chunks are uneven, and each rank holds only its own.
    assert isinstance(embed, DTensor) and embed.to_local().shape[0] == 255 - dist.get_rank()
    model.save_pretrained(hf_out, is_writer=dist.get_rank() == 0)
    dist.barrier()
    return True


@pytest.mark.processes
def test_sharded_model_fills_from_hf_and_saves_back(hf_dir, tmp_path):
    from helpers.processes import run_on_ranks

    out = tmp_path / "back"
    assert run_on_ranks(_fsdp_round_trip, str(hf_dir), str(out)) == [True, True]
    _assert_same_hf(out, hf_dir)


# ---------------------------------------------------------------- errors


def test_missing_rank_folder_is_named(tp4, tmp_path, capsys):
    (tp4 / "iter_0000001" / "mp_rank_02" / "model_optim_rng.pt").unlink()
    err = _error(capsys, f"--loader megatron --saver hf --load-dir {tp4} --save-dir {tmp_path / 'o'}")
    assert "mp_rank_02" in err and "TP=4" in err
    assert not (tmp_path / "o").exists()


def test_shapes_disagreeing_across_ranks(tp4, tmp_path, capsys):
    file = tp4 / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(file, weights_only=False)
    encoder = state["model"]["language_model"]["encoder"]
    encoder["layers.2.self_attention.dense.weight"] = encoder["layers.2.self_attention.dense.weight"][:, :8]
    torch.save(state, file)
    err = _error(capsys, f"--loader megatron --saver hf --load-dir {tp4} --save-dir {tmp_path / 'o'}")
    assert "encoder.layers.2.self_attention.dense.weight" in err and "mp_rank_01" in err and "agree" in err


def test_tp_must_divide_kv_groups(hf_dir, tmp_path, capsys):
    out = tmp_path / "o"
    err = _error(
        capsys,
        f"--loader hf --saver megatron --load-dir {hf_dir} --save-dir {out} --target-tensor-parallel-size 3",
    )
    assert "3 does not divide the 8 KV groups" in err and "--target-tensor-parallel-size" in err


@pytest.mark.parametrize("option", ["loader", "saver"])
def test_unknown_loader_or_saver(hf_dir, tmp_path, capsys, option):
    argv = {"loader": "hf", "saver": "megatron", option: "nemo"}
    with pytest.raises(SystemExit) as exit_info:
        _convert(
            f"--loader {argv['loader']} --saver {argv['saver']} --load-dir {hf_dir} --save-dir {tmp_path}/o"
        )
    assert exit_info.value.code == 2
    assert f"argument --{option}: invalid choice: 'nemo'" in capsys.readouterr().err


def test_overwrite_replaces_only_a_previous_output(hf_dir, tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    command_line = f"--loader hf --saver hf --load-dir {hf_dir} --save-dir {target}"
    err = _error(capsys, command_line)
    assert "exists and is not empty" in err and "--overwrite" in err
    err = _error(capsys, command_line + " --overwrite")
    assert "notes.txt" in err and "refusing to replace it even with --overwrite" in err
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"

    (target / "notes.txt").unlink()
    assert _convert(command_line + " --dtype fp32") == 0  # an empty folder needs no --overwrite
    assert "exists and is not empty" in _error(capsys, command_line)
    assert _convert(command_line + " --overwrite") == 0  # a previous HF output is replaced
    _assert_same_hf(target, hf_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing moved aside is left


def test_megatron_overwrite_replaces_only_a_previous_megatron_output(hf_dir, tmp_path, capsys):
    target = tmp_path / "mg"
    command_line = f"--loader hf --saver megatron --load-dir {hf_dir} --save-dir {target}"
    assert _convert(command_line + " --target-tensor-parallel-size 2") == 0
    assert _convert(command_line + " --overwrite") == 0
    assert sorted(p.name for p in (target / "iter_0000001").iterdir()) == ["mp_rank_00"]
    (target / "iter_0000001" / "README.md").write_text("my notes")
    err = _error(capsys, command_line + " --overwrite")
    assert "iter_0000001/README.md" in err and "refusing" in err
    assert (target / "iter_0000001" / "README.md").read_text() == "my notes"


# ---------------------------------------------------------------- what convert cannot represent

SMALL_HF = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}


def _transformers_folder(path: Path, model_class, config_class, **changes) -> Path:
    """A folder as transformers itself saves that architecture."""
    torch.manual_seed(0)
    model_class(config_class(**SMALL_HF, **changes)).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("model", "changes", "message"),
    [
        ("mistral", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ("llama", {"rope_parameters": LLAMA3_ROPE}, "rope scaling 'llama3' is not supported"),
        ("llama", {"attention_bias": True}, "attention_bias=true is not supported"),
        ("llama", {"mlp_bias": True}, "mlp_bias=true is not supported"),
        (
            "mixtral",
            {"num_local_experts": 2, "num_experts_per_tok": 1},
            "model_type 'mixtral' is not supported",
        ),
    ],
    ids=["gelu", "llama3_rope", "attention_bias", "mlp_bias", "mixtral"],
)
@pytest.mark.parametrize("saver", ["hf", "megatron"])
def test_convert_refuses_what_it_cannot_represent(tmp_path, capsys, model, changes, message, saver):
    classes = {
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig),
    }
    source = _transformers_folder(tmp_path / "in", *classes[model], **changes)
    err = _error(capsys, f"--loader hf --saver {saver} --load-dir {source} --save-dir {tmp_path / 'out'}")
    assert f"{source / 'config.json'}: {message}" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_convert_refuses_tensors_it_would_drop(hf_dir, tmp_path, capsys):
    source = tmp_path / "in"
    shutil.copytree(hf_dir, source)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, source / "model.safetensors")
    err = _error(capsys, f"--loader hf --saver hf --load-dir {source} --save-dir {tmp_path / 'out'}")
    assert f"{source}: holds 1 tensor(s) a Mistral model has no place for" in err
    assert "model.layers.1.self_attn.q_proj.bias" in err and "would drop them" in err
    assert not (tmp_path / "out").exists()


def test_a_dense_llama_folder_converts_to_the_same_model(tmp_path):
    source = _transformers_folder(tmp_path / "llama", transformers.LlamaForCausalLM, transformers.LlamaConfig)
    assert _convert(f"--loader hf --saver hf --load-dir {source} --save-dir {tmp_path / 'out'}") == 0
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    llama = transformers.LlamaForCausalLM.from_pretrained(source).eval()
    mistral = transformers.MistralForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(mistral(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


def _interrupt_third_call(monkeypatch, owner, attribute: str) -> None:
    original, calls = getattr(owner, attribute), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, interrupting)


def test_interrupted_megatron_save_leaves_nothing_that_looks_complete(hf_dir, tmp_path, monkeypatch):
    _interrupt_third_call(monkeypatch, megatron.torch, "save")  # after two of the four rank files
    with pytest.raises(KeyboardInterrupt):
        _convert(
            f"--loader hf --saver megatron --load-dir {hf_dir} --save-dir {tmp_path}/out --target-tensor-parallel-size 4"
        )
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temporary sibling


def test_interrupted_hf_save_leaves_nothing_that_looks_complete(tp4, tmp_path, monkeypatch):
    _interrupt_third_call(monkeypatch, megatron.MegatronCheckpoint, "read")
    with pytest.raises(KeyboardInterrupt):
        _convert(f"--loader megatron --saver hf --load-dir {tp4} --save-dir {tmp_path}/out")
    assert [p.name for p in tmp_path.iterdir()] == ["tp4"]
