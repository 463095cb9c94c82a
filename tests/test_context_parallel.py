"""Context parallelism: attention on 2 and 4 gloo ranks equals dense attention over the whole sequence on one
process (outputs and every q/k/v gradient), for windows inside one shard, spanning several (multi-hop halos),
reaching the whole prefix and no window (zig-zag shards, gathered K/V), and packed documents with boundaries on
shard edges; and through `fit`, CP4, TP2 × CP2 and DP2 × CP2 log the losses and gradient norms of one process."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from helpers.attention import dense_reference, packed_documents, random_qkv
from helpers.halo_ranks import cases_on_ranks
from helpers.processes import run_on_ranks
from helpers.training import Recorder, datamodule, launch, module, trainer, write_instruction_data

from mistral_lightning import MistralConfig
from mistral_lightning.benchmarks.context_parallel_halo import position_bytes, received_bytes_per_layer
from mistral_lightning.config import window_choice_note
from mistral_lightning.distributed import context_shard_slices, zigzag_context_shards
from mistral_lightning.training.context_parallel import halo_length, hop_sizes
from mistral_lightning.training.module import MistralLightningModule

SEQ = 48


# (ranks, window, packed documents): a window inside one shard, spanning several (multi-hop), reaching the whole
# prefix (zig-zag with a window: shards of 24, W - 1 = 29), and none (zig-zag).
CASES = [
    (2, 5, False),
    (2, None, True),
    (2, 30, True),
    (4, 5, True),
    (4, 30, False),
    (4, 30, True),
    (4, None, False),
]
# One layer's byte count on 4 ranks: window 20 over shards of 8 (hops of 8, 8, 3), 2 KV heads of 16, fp32.
COUNTED = (32, 20, 4, 2, 16)


@pytest.fixture(scope="module")
def on_ranks() -> dict:
    """Every case's inputs, dense reference and the ranks' results: one start of 2 ranks and one of 4."""
    inputs = {}
    for case in CASES:
        ranks, window, packed = case
        q, k, v = random_qkv(SEQ)
        documents = packed_documents(SEQ) if packed else None
        expected = dense_reference(q, k, v, window, documents)
        grad = torch.randn_like(expected)
        inputs[case] = (
            expected.detach(),
            torch.autograd.grad(expected, (q, k, v), grad),
            (q, k, v, window, documents, grad),
        )
    results = {}
    for ranks in (2, 4):
        cases = [case for case in CASES if case[0] == ranks]
        ran = run_on_ranks(
            cases_on_ranks,
            [inputs[case][2] for case in cases],
            COUNTED if ranks == 4 else None,
            world_size=ranks,
        )
        for index, case in enumerate(cases):
            results[case] = [rank["cases"][index] for rank in ran]
        if ranks == 4:
            results["bytes"] = [rank["bytes"] for rank in ran]
    return {"inputs": inputs, "results": results}


@pytest.mark.processes
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=[
        "cp2-w5",
        "cp2-nowindow-packed",
        "cp2-w30-zigzag-packed",
        "cp4-w5-packed",
        "cp4-w30-multihop",
        "cp4-w30-packed",
        "cp4-nowindow",
    ],
)
def test_halo_attention_on_ranks_equals_dense_attention(on_ranks, case):
    expected, want, _ = on_ranks["inputs"][case]
    results = on_ranks["results"][case]

    def whole(pieces, like):  # each rank's [B, shard, ...] piece put back at its positions
        out = torch.full_like(like, float("nan"))
        for positions, piece in pieces:
            out[:, torch.from_numpy(positions)] = torch.from_numpy(piece)
        return out

    torch.testing.assert_close(whole([(positions, out) for positions, out, _ in results], expected), expected)
    for index, name in enumerate("qkv"):
        got = whole([(positions, grads[index]) for positions, _, grads in results], want[index])
        torch.testing.assert_close(got, want[index], msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.processes
def test_the_bytes_each_rank_receives_equal_the_halo_formula(on_ranks):
    """Counted from the exchange's own irecv calls on 4 ranks, window 20 over shards of 8."""
    rows = on_ranks["results"]["bytes"]
    per_position = position_bytes(2, 16, 4)
    for rank, row in enumerate(rows):
        assert row["forward"] == halo_length(20, 8, rank) * per_position
    # Backward returns each halo's gradient to its owners: what rank r received, it sends back.
    assert sum(row["backward"] for row in rows) == sum(row["forward"] for row in rows)
    halo, gathered = received_bytes_per_layer(20, 32, 4, 3, per_position).values()
    assert (halo, gathered) == (19 * per_position, 24 * per_position)


def test_hop_sizes_by_hand():
    """Shards of 12: W=5 needs 4 positions from the previous rank; W=30 needs 29: 12 + 12 + 5 over 3 hops."""
    assert hop_sizes(5, 12) == [4]
    assert hop_sizes(30, 12) == [12, 12, 5]
    assert [halo_length(30, 12, rank) for rank in range(4)] == [0, 12, 24, 29]


def test_zigzag_shards_when_the_window_reaches_the_whole_prefix_and_balance_the_causal_work():
    """48 positions on 4 ranks: no window, or W - 1 ≥ 36 positions before the last shard, cut 8 chunks of 6 and
    give rank r chunks r and 7 - r; shorter windows keep contiguous shards of 12. Counted by hand, the causal
    (query, key) pairs per rank are then equal, where contiguous shards give 78, 222, 366, 510."""
    assert [zigzag_context_shards(window, 48, 4) for window in (None, 37, 36, 5)] == [
        True,
        True,
        False,
        False,
    ]
    assert not zigzag_context_shards(None, 48, 1)
    assert context_shard_slices(48, 1, 4, zigzag=True) == (slice(6, 12), slice(36, 42))
    assert context_shard_slices(48, 1, 4, zigzag=False) == (slice(12, 24),)

    def causal_pairs(zigzag):
        return [
            sum(
                position + 1
                for part in context_shard_slices(48, rank, 4, zigzag)
                for position in range(48)[part]
            )
            for rank in range(4)
        ]

    assert causal_pairs(zigzag=False) == [78, 222, 366, 510]
    assert causal_pairs(zigzag=True) == [294] * 4


# ---------------------------------------------------------------------- through fit, on 4 gloo ranks
def _tiny(window: int | None) -> dict:
    return dataclasses.asdict(MistralConfig.from_name("tiny", sliding_window=window))


# Sequences of 32 positions: shards of 8 under CP4 and 16 under CP2. Window 5: one hop (overlapped); 12: two
# hops (8 + 3), with packed documents; none, and the `tiny` preset's 64: zig-zag shards.
FIT_STEPS = 6  # the 6 steps: the warmup, the cosine decay, and four after the step-2 checkpoint
FIT_RUNS = {
    "cp4_window5": {"context_parallel": 4, "window": 5, "checkpoint_every": 2},
    "cp4_no_window": {"context_parallel": 4, "window": None},
    "tp2_cp2_window5": {"context_parallel": 2, "tensor_parallel": 2, "window": 5},
    "dp2_cp2_window5": {"context_parallel": 2, "data_parallel": 2, "window": 5},
    "cp4_packed_window12": {"context_parallel": 4, "window": 12, "instruction": True},
    # Megatron's per-micro-batch mean: the shards of one micro-batch hold different numbers of labelled tokens.
    "cp4_packed_micro_batch": {
        "context_parallel": 4,
        "window": 12,
        "instruction": True,
        "module": {"loss_normalization": "micro_batch"},
    },
}


@pytest.fixture(scope="module")
def instruction_data(tmp_path_factory) -> str:
    """Samples of 5 to 13 tokens packed into 32-position bins: document boundaries inside and on shard edges."""
    prefix = str(tmp_path_factory.mktemp("instruction") / "packed")
    samples = [(2 + index % 4, 3 + index % 7) for index in range(48)]
    return write_instruction_data(prefix, samples)


@pytest.fixture(scope="module")
def four_ranks(toy_data, instruction_data, killed_checkpoint, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("four_ranks")
    scenarios = [
        {
            "name": name,
            "data": instruction_data if run.get("instruction") else toy_data,
            "instruction": run.get("instruction", False),
            "context_parallel": run["context_parallel"],
            "tensor_parallel": run.get("tensor_parallel", 1),
            "data_parallel": run.get("data_parallel", 1),
            "module": {"model_config": _tiny(run["window"]), **run.get("module", {})},
            "checkpoint_every": run.get("checkpoint_every"),
            "max_steps": FIT_STEPS,
        }
        for name, run in FIT_RUNS.items()
    ]
    # The CP4 run's own step-2 checkpoint, resumed under CP4 (scenarios run in order, in the same ranks).
    scenarios.append(
        {
            **scenarios[0],
            "name": "cp4_resumed",
            "checkpoint_every": None,
            "resume": str(folder / "cp4_window5" / "checkpoints" / "step=2.ckpt"),
        }
    )
    # The one-process run's checkpoint after step 3 (the `tiny` preset, window 64), resumed by DP2 × CP2.
    scenarios.append(
        {
            "name": "dp2_cp2_resumes_cp1",
            "data": toy_data,
            "context_parallel": 2,
            "data_parallel": 2,
            "resume": str(killed_checkpoint),
        }
    )
    codes, results, output = launch(scenarios, folder, nprocs=4, timeout=600)
    assert codes == [0] * 4 and results is not None, output
    return results


def _one_process(data: str, window: int | None, instruction: bool, root, **module_kwargs) -> Recorder:
    recorder = Recorder()
    trainer(root, callbacks=[recorder], max_steps=FIT_STEPS).fit(
        module(model_config=_tiny(window), **module_kwargs),
        datamodule=datamodule(data, instruction=instruction),
    )
    return recorder


@pytest.mark.processes
@pytest.mark.parametrize("run", list(FIT_RUNS))
def test_context_parallel_fit_logs_the_one_process_losses_and_gradient_norms(
    four_ranks, toy_data, instruction_data, single_thread, tmp_path, run
):
    settings = FIT_RUNS[run]
    data = instruction_data if settings.get("instruction") else toy_data
    expected = _one_process(
        data, settings["window"], settings.get("instruction", False), tmp_path, **settings.get("module", {})
    )
    got = four_ranks[run]
    assert len(got["losses"]) == len(expected.losses) == FIT_STEPS
    assert got["losses"] == pytest.approx(expected.losses, rel=1e-5, abs=1e-6)
    assert got["grad_norms"] == pytest.approx(expected.grad_norms, rel=1e-5, abs=1e-6)


def test_a_window_imposed_on_windowless_weights_is_said_in_one_line(tmp_path, caplog):
    """The recipe's case: v0.2-style weights whose config.json has no window, trained with the 4096 window."""
    folder = tmp_path / "v0.2-like"
    folder.mkdir()
    windowless = MistralConfig.from_name("tiny", sliding_window=None)
    (folder / "config.json").write_text(json.dumps(windowless.to_hf_dict()))
    imposed = MistralConfig.from_name("tiny", sliding_window=4096)
    note = window_choice_note(imposed, folder)
    assert note is not None and "\n" not in note
    assert "sliding_window=4096" in note and "no sliding window" in note and str(folder) in note
    assert window_choice_note(windowless, folder) is None
    with caplog.at_level(logging.INFO):
        MistralLightningModule(model_config=dataclasses.asdict(imposed), pretrained=str(folder))
    assert note in caplog.text


@pytest.mark.processes
def test_a_one_process_checkpoint_resumes_under_context_parallelism(four_ranks, reference):
    resumed = four_ranks["dp2_cp2_resumes_cp1"]
    assert resumed["losses"] == pytest.approx(reference.losses[3:], rel=1e-5, abs=1e-6)


@pytest.mark.processes
def test_resume_under_context_parallelism_repeats_the_straight_run_exactly(four_ranks):
    """CP4, window 5: the run's checkpoint after step 2 (what a run stopped there leaves), resumed under CP4."""
    straight, resumed = four_ranks["cp4_window5"], four_ranks["cp4_resumed"]
    assert len(resumed["losses"]) == FIT_STEPS - 2
    assert resumed["losses"] == straight["losses"][2:]
    assert resumed["grad_norms"] == straight["grad_norms"][2:]
